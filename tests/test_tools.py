"""Tool plugins (issue 25, first part): registry, crop/zoom, calculator, tool-call parsing, the
tool chat template, and the runner's containment of misbehaving tools.

Expected values are computed independently of the code under test: crops against numpy
slices of the source, resized sizes by hand from smart_resize's formula, calculator results
by hand, rendered conversations written out character by character."""

from __future__ import annotations

import json
import math
import os
import threading
import time

import numpy as np
import pytest
from PIL import Image

from framework.errors import ConfigError, UnknownNameError
from framework.registry import TOOLS
from tools import CalculatorTool, CropTool, Tool, ToolContext, ToolResult, ZoomTool, build_tool, evaluate
from tools.base import ToolArgumentError, validate_arguments
from tools.config import ToolsConfig
from tools.format import TOOL_CHAT_TEMPLATE, parse_tool_calls, render, tool_message, tool_turn_text
from tools.image import resize_options
from tools.runner import ToolBudget, ToolRunner

# the tiny model's image processor bounds (framework/models/tiny.py: build_image_processor)
TINY = dict(factor=28, min_pixels=28 * 28, max_pixels=28 * 28 * 64)


def rand_image(w: int, h: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


# --------------------------------------------------------------------------- registry


def test_registry_and_build():
    assert {"crop", "zoom", "calculator"} <= set(TOOLS.names())
    assert TOOLS.entry_point_group == "apo_rl.tools"
    t = build_tool("zoom", {"max_scale": 3})
    assert isinstance(t, ZoomTool) and t.name == "zoom" and t.max_scale == 3.0
    with pytest.raises(ConfigError, match=r"tools.params.crop.size: unknown parameter.*accepted: .*factor"):
        build_tool("crop", {"size": 3})
    with pytest.raises(ConfigError, match=r"tools.params.crop: max_aspect"):
        build_tool("crop", {"max_aspect": 500})
    with pytest.raises(UnknownNameError, match="unknown tool 'ocr'.*calculator, crop, zoom"):
        build_tool("ocr")
    s = build_tool("calculator").schema()
    assert s["type"] == "function" and s["function"]["name"] == "calculator"
    assert s["function"]["parameters"]["required"] == ["expression"]


def test_validate_arguments():
    schema = CropTool.parameters
    assert validate_arguments({"bbox": [0, 0, 1, 1]}, schema) is None
    assert validate_arguments({"bbox": [0, 0, 1]}, schema) == "arguments.bbox: [0, 0, 1] is too short"
    assert validate_arguments({}, schema) == "arguments: 'bbox' is a required property"
    assert validate_arguments({"bbox": [0, 0, 1, "x"]}, schema) == "arguments.bbox[3]: 'x' is not of type 'number'"
    assert validate_arguments({"bbox": [0, 0, 1, True]}, schema) == "arguments.bbox[3]: True is not of type 'number'"
    assert "image_index: -1 is less than the minimum of 0" in validate_arguments(
        {"bbox": [0, 0, 1, 1], "image_index": -1}, schema
    )
    assert "image_index: 0.5 is not of type 'integer'" in validate_arguments(
        {"bbox": [0, 0, 1, 1], "image_index": 0.5}, schema
    )
    assert "('zoom' was unexpected)" in validate_arguments({"bbox": [0, 0, 1, 1], "zoom": 2}, schema)
    assert "'polar' is not one of" in validate_arguments({"bbox": [0, 0, 1, 1], "coordinates": "polar"}, schema)
    assert validate_arguments([1], schema) == "arguments: [1] is not of type 'object'"
    assert validate_arguments({"bbox": [0, 0, 1, float("nan")]}, schema) == (
        "arguments: numbers must be finite (no NaN or Infinity)"
    )


# --------------------------------------------------------------------------- crop / zoom


def test_crop_pixel_and_relative_boxes_are_the_numpy_slice():
    img = rand_image(224, 168, seed=1)
    src = np.asarray(img)
    crop = CropTool(**TINY)
    ctx = ToolContext(images=[rand_image(56, 56, seed=9), img])
    # 84 x 84 pixels: on the 28-grid and within [784, 3136] pixels, so returned unresized
    for box in ([28, 56, 112, 140], [28 / 224, 56 / 168, 112 / 224, 140 / 168]):
        res = crop({"image_index": 1, "bbox": box}, ctx)
        assert res.error is None, res.error
        assert len(res.images) == 1
        np.testing.assert_array_equal(np.asarray(res.images[0]), src[56:140, 28:112])
    # "coordinates": "pixel" forces a small box to be read as pixels
    res = crop({"image_index": 1, "bbox": [0, 0, 1, 1], "coordinates": "pixel"}, ctx)
    assert res.error == "bbox [0, 0, 1, 1] is 1x1 pixels of the image; each side must be at least 4"


def test_crop_resizes_onto_the_processor_grid():
    img = rand_image(400, 300, seed=2)
    crop = CropTool(**TINY)
    ctx = ToolContext(images=[img])
    # 300 x 200 (w x h) region: round to the grid gives 196 x 308 = 60368 > 50176 pixels, so
    # beta = sqrt(200 * 300 / 50176) = 1.09352; h = floor(200 / beta / 28) * 28 = 6 * 28 = 168,
    # w = floor(300 / beta / 28) * 28 = 9 * 28 = 252
    assert math.isclose(math.sqrt(200 * 300 / 50176), 1.09352, rel_tol=1e-5)
    res = crop({"bbox": [50, 40, 350, 240]}, ctx)
    assert res.images[0].size == (252, 168)
    # 10 x 10 region: rounds to 0 x 0 < 784, so beta = sqrt(784 / 100) = 2.8, sides ceil(10 * 2.8 / 28) * 28 = 28
    res = crop({"bbox": [0, 0, 10, 10]}, ctx)
    assert res.images[0].size == (28, 28)
    # the result is what the processor takes unchanged: grid 28/14 = 2 patches per side
    for w, h in ((252, 168), (28, 28)):
        assert w % 28 == 0 and h % 28 == 0 and 784 <= w * h <= 50176


def test_crop_processor_frame_and_resize_options(vl_bundle):
    opts = resize_options(vl_bundle.processor.image_processor)
    assert opts == TINY
    # the runner gives the model's processor bounds to the tools that take them; the config wins
    cfg = ToolsConfig(enabled=["crop", "zoom", "calculator"], params={"zoom": {"max_pixels": 3136}}, isolate=False)
    runner = ToolRunner(cfg, image_processor=vl_bundle.processor.image_processor)
    assert runner.params == {"crop": TINY, "zoom": {**TINY, "max_pixels": 3136}, "calculator": {}}
    assert (runner.tools["zoom"].factor, runner.tools["zoom"].max_pixels) == (28, 3136)
    img = rand_image(448, 336, seed=3)
    src = np.asarray(img)
    # the processor shows 448 x 336 (150528 px > 50176) at beta = sqrt(448*336/50176) = 1.7321:
    # h = floor(336 / 1.7321 / 28) * 28 = 6 * 28 = 168, w = floor(448 / 1.7321 / 28) * 28 = 9 * 28 = 252,
    # so a pixel in the model's frame is 448/252 = 16/9 source pixels wide and 336/168 = 2 high
    crop = CropTool(**opts, pixel_frame="processor", resample="nearest")
    res = crop({"bbox": [63, 42, 126, 84], "coordinates": "pixel"}, ToolContext(images=[img]))
    assert res.error is None, res.error
    # 63 * 16/9 = 112, 126 * 16/9 = 224; 42 * 2 = 84, 84 * 2 = 168: a 112 x 84 region, on the grid
    np.testing.assert_array_equal(np.asarray(res.images[0]), src[84:168, 112:224])
    out = crop({"bbox": [0, 0, 300, 100], "coordinates": "pixel"}, ToolContext(images=[img]))
    assert out.error.startswith("pixel bbox [0, 0, 300, 100] lies outside the image (252x168 pixels")


def test_zoom_enlarges_by_scale():
    img = rand_image(224, 224, seed=4)
    src = np.asarray(img)
    zoom = ZoomTool(**TINY, resample="nearest")
    res = zoom({"bbox": [56, 28, 112, 84], "scale": 2}, ToolContext(images=[img]))
    assert res.error is None
    expected = np.repeat(np.repeat(src[28:84, 56:112], 2, axis=0), 2, axis=1)  # 112 x 112: on the grid
    np.testing.assert_array_equal(np.asarray(res.images[0]), expected)
    # the default scale is 2
    res2 = zoom({"bbox": [0.25, 0.125, 0.5, 0.375]}, ToolContext(images=[img]))
    np.testing.assert_array_equal(np.asarray(res2.images[0]), expected)
    assert (
        zoom({"bbox": [0, 0, 0.5, 0.5], "scale": 9}, ToolContext(images=[img])).error
        == "scale must be in [1, 4], got 9"
    )


@pytest.mark.parametrize(
    "arguments, message",
    [
        ({"bbox": [0, 0, 0.5, 0.5], "image_index": 2}, "image_index 2 is out of range: there are 1 images (0..0)"),
        ({"bbox": [0.5, 0, 0.2, 0.5]}, "bbox [0.5, 0, 0.2, 0.5] must have x1 < x2 and y1 < y2"),
        ({"bbox": [0, 0, 1.0, 1.0], "coordinates": "relative", "image_index": 0}, None),
        (
            {"bbox": [-0.1, 0, 0.5, 0.5], "coordinates": "relative"},
            "relative bbox [-0.1, 0, 0.5, 0.5] must lie in [0, 1]",
        ),
        (
            {"bbox": [0, 0, 120, 50]},
            "pixel bbox [0, 0, 120, 50] lies outside the image (100x80 pixels, width x height)",
        ),
        ({"bbox": [0, 0, 100, 2]}, "bbox [0, 0, 100, 2] is 100x2 pixels of the image; each side must be at least 4"),
        (
            {"bbox": [0, 0, 100, 4], "coordinates": "pixel"},
            "bbox [0, 0, 100, 4] is too elongated (aspect ratio above 20)",
        ),
        ({"bbox": "0 0 1 1"}, "bad arguments for 'crop': arguments.bbox: '0 0 1 1' is not of type 'array'"),
        ({"box": [0, 0, 1, 1]}, "bad arguments for 'crop': arguments: 'bbox' is a required property"),
    ],
)
def test_crop_bad_arguments_are_error_results(arguments, message):
    crop = CropTool(**TINY, max_aspect=20)
    crop.name = "crop"
    res = crop(arguments, ToolContext(images=[rand_image(100, 80)]))
    assert isinstance(res, ToolResult)
    assert res.error == message
    if message is not None:
        assert res.images == [] and res.status == "error" and res.model_text() == f"Error: {message}"


def test_crop_without_images():
    assert CropTool()({"bbox": [0, 0, 1, 1]}, ToolContext()).error == "there is no image in this conversation"


# --------------------------------------------------------------------------- calculator


@pytest.mark.parametrize(
    "expression, expected",
    [
        ("(3 + 4) * 2 / 7", "2"),
        ("2 ** 10", "1024"),
        ("-3 ** 2", "-9"),  # ** binds tighter than unary minus, as in Python and maths
        ("(-3) ** 2", "9"),
        ("7 // 2 + 7 % 3", "4"),
        ("10 / 4", "2.5"),
        ("1 / 3", "0.333333333333"),
        ("sqrt(16) + abs(-2)", "6"),
        ("max(1, 5, 3) - min(4, 2)", "3"),
        ("round(2.675, 1)", "2.7"),
        ("floor(-2.5) + ceil(2.1)", "0"),
        ("2 * pi", "6.28318530718"),
        ("log(e ** 2)", "2"),
        ("12345678901234567890 * 10", "123456789012345678900"),
        ("2 ** -2", "0.25"),
    ],
)
def test_calculator_values(expression, expected):
    res = CalculatorTool()({"expression": expression}, ToolContext())
    assert res.error is None, res.error
    assert res.text == expected


@pytest.mark.parametrize(
    "expression, message",
    [
        ("__import__('os')", "'__import__' is not allowed"),
        ("2**10**10", "exponent 10000000000 exceeds 1000"),
        ("'a'*10**9", "only numbers are allowed, got str"),
        ("[1]*10**9", "'List' is not allowed"),
        ("9**9**9", "exponent 387420489 exceeds 1000"),
        ("10**100 * 10**100", "result exceeds 10**100"),
        ("2**999", "result exceeds 10**100"),
        ("1e999", "result is not finite"),
        ("1e308 * 10", "result exceeds 10**100"),
        ("().__class__", "'Attribute' is not allowed"),
        ("(lambda: 1)()", "'Call' is not allowed"),
        ("x + 1", "'Name' is not allowed"),
        ("sqrt(-1)", "sqrt: math domain error"),
        ("1 / 0", "division by zero"),
        ("5 % 0", "division by zero"),
        ("0 ** -1", "division by zero"),
        ("(-8) ** (1/3)", "result is not a real number"),
        ("exp(1000)", "exp: math range error"),
        ("True + 1", "only numbers are allowed, got bool"),
        ("1j", "only numbers are allowed, got complex"),
        ("sqrt(x=4)", "sqrt takes 1..1 positional arguments"),
        ("1 +", "not an arithmetic expression (SyntaxError)"),
        ("(" * 150 + "1" + ")" * 150, "expression is longer than 200 characters"),
        ("-" * 150 + "1", "expression has more than 100 parts"),
        ("9" * 120, "result exceeds 10**100"),
    ],
)
def test_calculator_refuses_quickly(expression, message):
    t0 = time.perf_counter()
    res = CalculatorTool()({"expression": expression}, ToolContext())
    assert time.perf_counter() - t0 < 0.2
    assert res.error is not None and message in res.error, res.error
    with pytest.raises(ToolArgumentError):
        evaluate(expression)


# --------------------------------------------------------------------------- parsing


SCHEMAS = {"calculator": CalculatorTool.parameters, "crop": CropTool.parameters}


def test_parse_calls_in_order():
    text = (
        "I will compute.\n<tool_call>\n"
        + json.dumps({"name": "calculator", "arguments": {"expression": "1+2"}})
        + "\n</tool_call>\n"
        '<tool_call>{"name": "crop", "arguments": "{\\"bbox\\": [0, 0, 0.5, 0.5]}"}</tool_call>'
    )
    p = parse_tool_calls(text, SCHEMAS)
    assert p.content == "I will compute."
    assert [(c.name, c.arguments, c.index) for c in p.valid] == [
        ("calculator", {"expression": "1+2"}, 0),
        ("crop", {"bbox": [0, 0, 0.5, 0.5]}, 1),  # arguments as a JSON string are decoded
    ]
    assert p.errors == []
    assert text[p.calls[0].span[0] : p.calls[0].span[1]].startswith("<tool_call>")
    assert parse_tool_calls("<answer>3</answer>", SCHEMAS).calls == []


@pytest.mark.parametrize(
    "body, message",
    [
        (
            "{name: calculator}",
            "the tool call is not valid JSON (Expecting property name enclosed in double quotes): {name: calculator}",
        ),
        ('["calculator"]', 'a tool call must be a JSON object {"name": ..., "arguments": {...}}: ["calculator"]'),
        ('{"arguments": {}}', 'a tool call must be a JSON object {"name": ..., "arguments": {...}}: {"arguments": {}}'),
        ('{"name": "ocr", "arguments": {}}', "unknown tool 'ocr'; available: calculator, crop"),
        (
            '{"name": "calculator", "arguments": {"expr": "1"}}',
            "bad arguments for 'calculator': arguments: 'expression' is a required property",
        ),
        ('{"name": "calculator", "arguments": [1]}', "the arguments of 'calculator' must be a JSON object"),
        (
            '{"name": "calculator", "arguments": "1+1"}',
            "the arguments of 'calculator' are a string that is not a JSON object",
        ),
        (
            '{"name": "calculator", "arguments": {"expression": "1"}, "id": 3}',
            "unexpected key 'id' in the tool call (only name and arguments)",
        ),
        ("[" * 100000, "the tool call is not valid JSON"),
    ],
)
def test_parse_malformed_calls(body, message):
    p = parse_tool_calls(f"ok <tool_call>\n{body}\n</tool_call> and more", SCHEMAS)
    assert len(p.calls) == 1 and p.valid == []
    err = p.errors[0]
    assert err.error.startswith(message)
    res = err.result()
    assert res.status == "parse_error" and res.model_text().startswith("Error: " + message)


def test_parse_unclosed_call():
    p = parse_tool_calls(
        '<tool_call>{"name": "calculator", "arguments": {"expression": "1"}}</tool_call><tool_call>{"name"', SCHEMAS
    )
    assert [type(c).__name__ for c in p.calls] == ["ToolCall", "ToolCallError"]
    assert p.calls[1].error == '<tool_call> is not closed by </tool_call>: {"name"'


# --------------------------------------------------------------------------- chat template

SYSTEM_TOOLS = (
    "<|im_start|>system\nYou are a helpful assistant.\n\n# Tools\n\nYou may call one or more functions to assist "
    "with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
    '{"type": "function", "function": {"name": "calc", "description": "Add <b> & \'c\'", "parameters": '
    '{"type": "object", "properties": {"expression": {"type": "string"}}}}}\n</tools>\n\n'
    "For each function call, return a json object with function name and arguments within <tool_call></tool_call> "
    'XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n'
)
TOOLS_ARG = [
    {
        "type": "function",
        "function": {
            "name": "calc",
            "description": "Add <b> & 'c'",  # characters jinja2's own tojson would escape
            "parameters": {"type": "object", "properties": {"expression": {"type": "string"}}},
        },
    }
]
CONVERSATION = [
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How many dots?"}]},
    {
        "role": "assistant",
        "content": "Zoom first.",
        "tool_calls": [
            {"type": "function", "function": {"name": "zoom", "arguments": {"bbox": [0, 0, 0.5, 0.5]}}},
            {"type": "function", "function": {"name": "calc", "arguments": {"expression": "2+3"}}},
        ],
    },
    tool_message(ToolResult(text="Region [0, 0, 56, 56].", images=[object()]), "zoom"),
    tool_message(ToolResult(text="5"), "calc"),
    {"role": "assistant", "content": "<answer>5</answer>"},
]
RENDERED = (
    SYSTEM_TOOLS + "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>How many dots?<|im_end|>\n"
    "<|im_start|>assistant\nZoom first.\n"
    '<tool_call>\n{"name": "zoom", "arguments": {"bbox": [0, 0, 0.5, 0.5]}}\n</tool_call>\n'
    '<tool_call>\n{"name": "calc", "arguments": {"expression": "2+3"}}\n</tool_call><|im_end|>\n'
    "<|im_start|>user\n<tool_response>\n<|vision_start|><|image_pad|><|vision_end|>Region [0, 0, 56, 56].\n</tool_response>\n"
    "<tool_response>\n5\n</tool_response><|im_end|>\n"
    "<|im_start|>assistant\n<answer>5</answer><|im_end|>\n"
)


@pytest.mark.parametrize("trim", [False, True])
def test_template_renders_tools_with_jinja2(trim):
    import jinja2

    env = jinja2.Environment(trim_blocks=trim, lstrip_blocks=trim)
    env.filters["tojson"] = lambda x: json.dumps(x, ensure_ascii=False)  # what transformers renders with
    out = env.from_string(TOOL_CHAT_TEMPLATE).render(
        messages=CONVERSATION, tools=TOOLS_ARG, add_generation_prompt=False
    )
    assert out == RENDERED
    assert render(CONVERSATION, TOOLS_ARG) == RENDERED
    # a system message of its own replaces the default in the tools block
    sys_msg = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    out = env.from_string(TOOL_CHAT_TEMPLATE).render(messages=sys_msg, tools=TOOLS_ARG, add_generation_prompt=True)
    assert out == SYSTEM_TOOLS.replace("You are a helpful assistant.", "Be brief.") + (
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )


def test_template_edge_cases():
    # system content as a list, an assistant turn with calls only, arguments as a JSON string
    # (OpenAI wire format) and a call without the {"function": ...} wrapper, a tool turn last
    msgs = [
        {"role": "system", "content": [{"type": "text", "text": "Sys."}]},
        {"role": "user", "content": "Q"},
        {"role": "assistant", "content": None, "tool_calls": [{"name": "calc", "arguments": '{"expression": "1"}'}]},
        {"role": "tool", "content": "1"},
    ]
    out = render(msgs, [{"type": "function", "function": {"name": "calc"}}], add_generation_prompt=True)
    assert out == (
        "<|im_start|>system\nSys.\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
        "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
        '{"type": "function", "function": {"name": "calc"}}\n</tools>\n\n'
        "For each function call, return a json object with function name and arguments within <tool_call></tool_call> "
        'XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\nQ<|im_end|>\n"
        '<|im_start|>assistant\n<tool_call>\n{"name": "calc", "arguments": {"expression": "1"}}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\n<tool_response>\n1\n</tool_response><|im_end|>\n<|im_start|>assistant\n"
    )


def test_template_with_the_tiny_tokenizer(vl_bundle):
    from framework.models.tiny import CHAT_TEMPLATE

    tok = vl_bundle.tokenizer
    out = tok.apply_chat_template(CONVERSATION, tools=TOOLS_ARG, chat_template=TOOL_CHAT_TEMPLATE, tokenize=False)
    assert out == RENDERED
    # without tools it renders plain conversations as the tiny model's own template does
    plain = [
        {"role": "system", "content": "S."},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How many shapes?"}]},
        {"role": "assistant", "content": "<answer>3</answer>"},
    ]
    for msgs in (plain, plain[1:]):
        for gen in (False, True):
            ours = tok.apply_chat_template(
                msgs, chat_template=TOOL_CHAT_TEMPLATE, tokenize=False, add_generation_prompt=gen
            )
            theirs = tok.apply_chat_template(
                msgs, chat_template=CHAT_TEMPLATE, tokenize=False, add_generation_prompt=gen
            )
            assert ours == theirs


def test_tool_turn_text_continues_the_conversation(vl_bundle):
    results = [ToolResult(text="Region [0, 0, 56, 56].", images=[object()]), ToolResult(text="5")]
    suffix = tool_turn_text(results)
    assert suffix == (
        "\n<|im_start|>user\n<tool_response>\n<|vision_start|><|image_pad|><|vision_end|>Region [0, 0, 56, 56].\n"
        "</tool_response>\n<tool_response>\n5\n</tool_response><|im_end|>\n<|im_start|>assistant\n"
    )
    embedded = [tool_message(r, embed_images=True) for r in results]
    assert embedded[0]["content"][0]["image"] is results[0].images[0] and tool_turn_text(embedded) == suffix
    assert tool_turn_text([ToolResult.fail("boom")]) == (
        "\n<|im_start|>user\n<tool_response>\nError: boom\n</tool_response><|im_end|>\n<|im_start|>assistant\n"
    )
    # prompt + the model's own text (ending in <|im_end|>) + suffix = the template's whole conversation
    prompt = render(CONVERSATION[:1], TOOLS_ARG, add_generation_prompt=True)
    model = (
        'Zoom first.\n<tool_call>\n{"name": "zoom", "arguments": {"bbox": [0, 0, 0.5, 0.5]}}\n</tool_call>\n'
        '<tool_call>\n{"name": "calc", "arguments": {"expression": "2+3"}}\n</tool_call><|im_end|>'
    )
    assert prompt + model + suffix + "<answer>5</answer><|im_end|>\n" == RENDERED
    # token ids: the suffix tokenized alone continues the ids exactly (<|im_end|> is a special token)
    tok = vl_bundle.tokenizer
    whole = tok(prompt + model + suffix, add_special_tokens=False)["input_ids"]
    parts = (
        tok(prompt + model, add_special_tokens=False)["input_ids"] + tok(suffix, add_special_tokens=False)["input_ids"]
    )
    assert whole == parts


def test_processor_takes_a_tool_image_unresized(vl_bundle):
    proc = vl_bundle.processor
    img = rand_image(200, 150, seed=5)
    res = CropTool(**resize_options(proc.image_processor))({"bbox": [0.1, 0.1, 0.9, 0.7]}, ToolContext(images=[img]))
    (w, h) = res.images[0].size
    text = render(CONVERSATION[:3], add_generation_prompt=True)
    assert text.count("<|image_pad|>") == 2
    batch = proc(text=[text], images=[img, res.images[0]], return_tensors="pt")
    # grid (t, h, w) in 14-pixel patches: the tool's image is not resized again by the processor
    assert batch["image_grid_thw"][1].tolist() == [1, h // 14, w // 14]
    n_pad = int((batch["input_ids"] == tok_id(proc, "<|image_pad|>")).sum())
    assert n_pad == int(batch["image_grid_thw"].prod(-1).sum()) // 4  # merge_size 2: 4 patches per token


def tok_id(proc, token: str) -> int:
    return proc.tokenizer.convert_tokens_to_ids(token)


# --------------------------------------------------------------------------- runner

RELEASE = threading.Event()  # lets the hanging test tool's thread end after its test


class Raises(Tool):
    def run(self, arguments, context):
        raise RuntimeError("disk on fire")


class Hangs(Tool):
    def run(self, arguments, context):
        RELEASE.wait(30)
        return ToolResult(text="late")


class Garbage(Tool):
    parameters = {"type": "object", "properties": {"kind": {"type": "string"}}, "required": ["kind"]}

    def run(self, arguments, context):
        kind = arguments["kind"]
        if kind == "str":
            return "just a string"
        if kind == "huge":
            return ToolResult(text="x" * 50_000_000)
        if kind == "images":
            return ToolResult(images=["not an image"])
        if kind == "many":
            return ToolResult(images=[rand_image(28, 28)] * 5)
        if kind == "bigimage":
            return ToolResult(images=[Image.new("RGB", (200, 200))])
        if kind == "exit":
            raise SystemExit(3)
        if kind == "die":
            os._exit(1)
        return ToolResult(text=kind)


def call(name: str, **arguments) -> str:
    return "<tool_call>\n" + json.dumps({"name": name, "arguments": arguments}) + "\n</tool_call>"


@pytest.mark.parametrize("isolate", [False, True], ids=["in_process", "isolated"])
def test_runner_contains_misbehaving_tools(isolate):
    # 1 s: room for the 50 MB string on a loaded machine; the hang costs 1 s, not more
    cfg = ToolsConfig(
        isolate=isolate,
        timeout_s=1.0,
        workers=4 if not isolate else 2,
        max_calls=20,
        max_calls_per_turn=8,
        max_result_chars=100,
        max_image_pixels=10_000,
    )
    runner = ToolRunner(cfg, {"raises": Raises, "hangs": Hangs, "garbage": Garbage, "calculator": CalculatorTool})
    try:
        runner.start()  # the workers' start (imports) is not part of the turn's time
        completions = [
            call("raises") + call("hangs") + call("calculator", expression="6*7"),
            call("garbage", kind="str") + call("garbage", kind="huge") + call("garbage", kind="images"),
            call("garbage", kind="many") + call("garbage", kind="bigimage") + call("garbage", kind="exit"),
            "<tool_call>{oops</tool_call>" + call("nope") + call("garbage", kind="fine"),
            "<answer>42</answer>",
        ]
        if isolate:  # a crash of the process: only a worker can contain it
            completions[4] = call("garbage", kind="die") + call("calculator", expression="2**5")
        ctxs = [ToolContext(images=[rand_image(28, 28)]) for _ in completions]
        budgets = [ToolBudget() for _ in completions]
        t0 = time.perf_counter()
        out = runner.run_turn(completions, ctxs, budgets)
        assert time.perf_counter() - t0 < 6.0  # the hang costs its time limit, not more
    finally:
        RELEASE.set()
    got = [[(r.status, r.model_text()[:60]) for r in o.results] for o in out]
    assert got[0] == [
        ("crash", "Error: 'raises' failed: RuntimeError: disk on fire"),
        ("timeout", "Error: 'hangs' did not answer within 1s"),
        ("ok", "42"),
    ]
    assert got[1][0] == ("bad_result", "Error: the tool returned str, not a ToolResult")
    assert got[1][1][0] == "bad_result"
    assert out[1].results[1].model_text() == (
        "Error: the tool returned 50000000 characters; at most 100 (tools.max_result_chars); the first 100 follow"
    )
    assert out[1].results[1].text == "x" * 100
    assert got[1][2] == ("bad_result", "Error: the tool returned a str among its images, not an imag")
    assert got[2][0] == ("bad_result", "Error: the tool returned 5 images; at most 2 (tools.max_resu")
    assert got[2][1][0] == "bad_result" and "200x200 image; at most 10000 pixels" in out[2].results[1].error
    assert got[2][2] == ("crash", "Error: 'garbage' failed: SystemExit: 3")
    assert [r.status for r in out[3].results] == ["parse_error", "parse_error", "ok"]
    assert out[3].names == [None, "nope", "garbage"]
    m = runner.metrics()
    assert m["tools/raises/crash"] == 1 and m["tools/hangs/timeout"] == 1
    assert m["tools/garbage/bad_result"] == 5 and m["tools/(invalid)/parse_error"] == 2
    if isolate:
        assert got[4] == [("crash", "Error: 'garbage' failed: worker died (exit code 1)"), ("ok", "32")]
        assert m["tools/garbage/calls"] == 8 and m["tools/garbage/crash"] == 2 and m["tools/calculator/calls"] == 2
        assert m["tools/worker_restarts"] >= 1 and m["tools/abandoned_threads"] == 0
    else:
        assert not out[4].called and out[4].text() == ""
        assert m["tools/garbage/calls"] == 7 and m["tools/garbage/crash"] == 1 and m["tools/calculator/calls"] == 1
        assert m["tools/abandoned_threads"] == 1
    assert [b.calls for b in budgets] == [3, 3, 3, 3, 2 if isolate else 0]
    # the run goes on: the same runner serves the next turn
    out = runner.run_turn([call("calculator", expression="1+1")], [ToolContext()], [ToolBudget()])
    assert out[0].results[0].text == "2"
    runner.close()


def test_runner_budgets_images_and_record_tools():
    cfg = ToolsConfig(
        enabled=["calculator", "crop"], params={"crop": TINY}, max_calls=3, max_calls_per_turn=2, isolate=False
    )
    runner = ToolRunner(cfg)
    img = rand_image(112, 112, seed=6)
    ctx = ToolContext(record={"metadata": {"tools": ["crop", "search"]}}, images=[img])
    assert [s["function"]["name"] for s in runner.schemas(ctx.record)] == ["crop"]
    assert [s["function"]["name"] for s in runner.schemas()] == ["calculator", "crop"]
    budget = ToolBudget()
    turn1 = (
        call("crop", bbox=[0, 0, 56, 56]) + call("crop", bbox=[56, 56, 112, 112]) + call("crop", bbox=[0, 0, 28, 28])
    )
    (o,) = runner.run_turn([turn1], [ctx], [budget])
    assert [r.status for r in o.results] == ["ok", "ok", "limit"]
    assert o.results[2].error == "not run: at most 2 tool calls per turn"
    np.testing.assert_array_equal(np.asarray(o.images()[1]), np.asarray(img)[56:112, 56:112])
    assert o.text().count("<|image_pad|>") == 2
    assert budget.calls == 3
    # the record does not allow the calculator; the trajectory has used its 3 calls anyway
    (o,) = runner.run_turn([call("calculator", expression="1")], [ctx], [budget])
    assert o.results[0].status == "limit" and "used its 3 tool calls" in o.results[0].error
    (o,) = runner.run_turn([call("calculator", expression="1")], [ctx], [ToolBudget()])
    assert o.results[0].error == "unknown tool 'calculator'; available: crop"
    runner.close()


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(enabled="crop"), "tools.enabled must be a list of tool names"),
        (dict(enabled=["crop", "crop"]), "tools.enabled names a tool twice"),
        (dict(enabled=["crop"], params={"zoom": {}}), "tools.params.zoom: 'zoom' is not in tools.enabled (crop)"),
        (dict(timeout_s=0), "tools.timeout_s must be a finite number > 0, got 0"),
        (dict(workers=0), "tools.workers must be an integer >= 1, got 0"),
        (dict(max_calls=-1), "tools.max_calls must be an integer >= 0, got -1"),
    ],
)
def test_config_errors_name_the_key(change, message):
    with pytest.raises(ConfigError) as e:
        ToolsConfig(**change).validate()
    assert str(e.value).startswith(message)


def test_runner_unknown_tool_and_bad_params():
    with pytest.raises(UnknownNameError, match="unknown tool 'ocr'"):
        ToolRunner(ToolsConfig(enabled=["ocr"]))
    # one tool name in a record's metadata is that tool, not its letters
    r = ToolRunner(ToolsConfig(enabled=["calculator", "crop"], isolate=False))
    assert r.allowed({"metadata": {"tools": "crop"}}) == ["crop"] and r.allowed({"metadata": {"tools": []}}) == []
    assert r.allowed({"id": 1}) == ["calculator", "crop"]
    with pytest.raises(ConfigError, match=r"tools.params.crop.bogus: unknown parameter"):
        ToolRunner(ToolsConfig(enabled=["crop"], params={"crop": {"bogus": 1}}))

    class Local(Tool):  # defined in a function: a worker process cannot import it
        pass

    with pytest.raises(ConfigError, match=r"tool 'local' \(.*<locals>.Local\) cannot be imported by a worker process"):
        ToolRunner(ToolsConfig(), {"local": Local})
    ToolRunner(ToolsConfig(isolate=False), {"local": Local}).close()  # in process it can run


def test_config_merges_as_a_typed_section():
    """ToolsConfig works as a section of the run's config (framework.config.check_section, the
    path SECTIONS take): values typed, unknown keys and bad values named."""
    from framework.config import check_section

    t = check_section({"enabled": ["zoom"], "params": {"zoom": {"max_scale": 3}}, "timeout_s": 2}, ToolsConfig, "tools")
    assert isinstance(t, ToolsConfig) and t.enabled == ["zoom"] and t.timeout_s == 2.0 and t.max_calls == 4
    with pytest.raises(ConfigError, match="unknown key 'tools.enabeld'; did you mean 'tools.enabled'"):
        check_section({"enabeld": []}, ToolsConfig, "tools")
    with pytest.raises(ConfigError, match="tools.params.crop: 'crop' is not in tools.enabled"):
        check_section({"enabled": ["zoom"], "params": {"crop": {}}}, ToolsConfig, "tools")
