"""Tool calls in Qwen2.5's convention: parsing them out of a completion, rendering their results
as ``tool`` messages, and the chat template that renders both (:data:`TOOL_CHAT_TEMPLATE`).

The model writes each call as (Qwen2.5's chat template, the ``# Tools`` system block)::

    <tool_call>
    {"name": "<function-name>", "arguments": <args-json-object>}
    </tool_call>

:func:`parse_tool_calls` finds every call of a completion in order. Each is a :class:`ToolCall`
or, when malformed, a :class:`ToolCallError` (counted, and answered with an error message so
the model learns the format): the JSON does not parse, is not an object with a string
``name`` and an object ``arguments``, names a tool that is not available, has arguments that do
not match the tool's schema, or a ``<tool_call>`` is never closed.

The results of a turn's calls go back to the model as one ``tool`` message each
(:func:`tool_message`), which the template renders, after the assistant's ``<|im_end|>``, as a
single user turn (consecutive tool messages share it)::

    <|im_start|>user
    <tool_response>
    <|vision_start|><|image_pad|><|vision_end|>Region [...] of image 0 ...
    </tool_response>
    <tool_response>
    Error: ...
    </tool_response><|im_end|>
    <|im_start|>assistant

:func:`tool_turn_text` returns exactly that text (rendered by the template itself), to append
to the trajectory's token ids after the model's ``<|im_end|>``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from .base import ToolResult, validate_arguments

# Qwen2-VL's template (framework/models/tiny.py: CHAT_TEMPLATE, images as
# <|vision_start|><|image_pad|><|vision_end|>, string or list content) extended with Qwen2.5's
# tool convention: the "# Tools" system block when tools= is given, assistant messages with
# tool_calls, and tool messages as <tool_response> blocks inside one user turn, here with
# images. Written without a newline right after a block tag, so that it renders the same with
# and without trim_blocks/lstrip_blocks (transformers renders with both on).
_CONTENT = (  # the content of `message`: a string, or a list of {type: image} / {type: text, text}
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% elif message['content'] is not none %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}"
)
TOOL_CHAT_TEMPLATE = (
    "{% set default_system = 'You are a helpful assistant.' %}"
    "{% if tools %}"
    "<|im_start|>system{{ '\\n' }}"
    "{% if messages[0]['role'] == 'system' %}{% set message = messages[0] %}" + _CONTENT + "{% else %}"
    "{{ default_system }}{% endif %}"
    "{{ '\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n"
    "You are provided with function signatures within <tools></tools> XML tags:\\n<tools>' }}"
    "{% for tool in tools %}{{ '\\n' }}{{ tool | tojson }}{% endfor %}"
    "{{ '\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments "
    'within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{"name": <function-name>, '
    '"arguments": <args-json-object>}\\n</tool_call><|im_end|>\\n\' }}'
    "{% elif messages[0]['role'] != 'system' %}"
    "<|im_start|>system{{ '\\n' }}{{ default_system }}<|im_end|>{{ '\\n' }}"
    "{% endif %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] == 'system' and tools %}"  # already in the tools block
    "{% elif message['role'] == 'tool' %}"
    "{% if loop.first or messages[loop.index0 - 1]['role'] != 'tool' %}<|im_start|>user{% endif %}"
    "{{ '\\n<tool_response>\\n' }}" + _CONTENT + "{{ '\\n</tool_response>' }}"
    "{% if loop.last or messages[loop.index0 + 1]['role'] != 'tool' %}<|im_end|>{{ '\\n' }}{% endif %}"
    "{% elif message['role'] == 'assistant' and message['tool_calls'] is defined and message['tool_calls'] %}"
    "<|im_start|>assistant{% if message['content'] %}{{ '\\n' }}" + _CONTENT + "{% endif %}"
    "{% for tool_call in message['tool_calls'] %}"
    "{% if tool_call['function'] is defined %}{% set tool_call = tool_call['function'] %}{% endif %}"
    "{{ '\\n<tool_call>\\n{\"name\": \"' }}{{ tool_call['name'] }}{{ '\", \"arguments\": ' }}"
    # arguments as a JSON string (OpenAI format) are written as they are, a mapping as JSON
    "{% if tool_call['arguments'] is string %}{{ tool_call['arguments'] }}"
    "{% else %}{{ tool_call['arguments'] | tojson }}{% endif %}"
    "{{ '}\\n</tool_call>' }}{% endfor %}<|im_end|>{{ '\\n' }}"
    "{% else %}"
    "<|im_start|>{{ message['role'] }}{{ '\\n' }}" + _CONTENT + "<|im_end|>{{ '\\n' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant{{ '\\n' }}{% endif %}"
)

TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"
_CALL_RE = re.compile(re.escape(TOOL_CALL_OPEN) + r"(.*?)" + re.escape(TOOL_CALL_CLOSE), re.DOTALL)
MAX_ERROR_SNIPPET = 80  # characters of a malformed call quoted back to the model


@dataclass
class ToolCall:
    """One well-formed call: the tool's ``name``, its ``arguments`` and its position ``index``
    among the completion's calls; ``span``: its characters in the completion."""

    name: str
    arguments: dict
    index: int
    span: tuple[int, int] = (0, 0)

    def message(self) -> dict:
        """As an entry of an assistant message's ``tool_calls`` (OpenAI format)."""
        return {"type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass
class ToolCallError:
    """A malformed call: why (``error``, read by the model) and what it was (``raw``)."""

    error: str
    raw: str
    index: int
    span: tuple[int, int] = (0, 0)
    name: str | None = None  # the tool it named, when it named one

    def result(self) -> ToolResult:
        return ToolResult.fail(self.error, status="parse_error")


@dataclass
class ParsedCompletion:
    """Every call of a completion in order (``calls`` holds both kinds), and the text before
    the first call (``content``)."""

    calls: list[ToolCall | ToolCallError] = field(default_factory=list)
    content: str = ""

    @property
    def valid(self) -> list[ToolCall]:
        return [c for c in self.calls if isinstance(c, ToolCall)]

    @property
    def errors(self) -> list[ToolCallError]:
        return [c for c in self.calls if isinstance(c, ToolCallError)]


def parse_tool_calls(completion: str, schemas: Mapping[str, Mapping[str, Any]] | None = None) -> ParsedCompletion:
    """Every ``<tool_call>...</tool_call>`` of ``completion`` in order.

    ``schemas``: ``{tool name: its JSON-schema parameters}`` of the tools available to this
    trajectory; a call to another name, or with arguments that do not match, is a
    :class:`ToolCallError`. None: names and arguments are not checked."""
    out = ParsedCompletion()
    first = completion.find(TOOL_CALL_OPEN)
    out.content = (completion if first < 0 else completion[:first]).strip()
    end = 0
    for m in _CALL_RE.finditer(completion):
        out.calls.append(_parse_one(m.group(1), len(out.calls), m.span(), schemas))
        end = m.end()
    rest = completion.find(TOOL_CALL_OPEN, end)
    if rest >= 0:  # an opened call that never closes (the model stopped mid-call, or forgot the tag)
        raw = completion[rest + len(TOOL_CALL_OPEN) :]
        out.calls.append(
            ToolCallError(
                f"<tool_call> is not closed by </tool_call>: {_snippet(raw)}",
                raw,
                len(out.calls),
                (rest, len(completion)),
            )
        )
    return out


def _parse_one(raw: str, index: int, span: tuple[int, int], schemas) -> ToolCall | ToolCallError:
    def fail(msg: str, name: str | None = None) -> ToolCallError:
        return ToolCallError(msg, raw, index, span, name)

    try:
        obj = json.loads(raw)
    except (ValueError, RecursionError) as e:
        return fail(f"the tool call is not valid JSON ({getattr(e, 'msg', type(e).__name__)}): {_snippet(raw)}")
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return fail(f'a tool call must be a JSON object {{"name": ..., "arguments": {{...}}}}: {_snippet(raw)}')
    name, args = obj["name"], obj.get("arguments", {})
    if isinstance(args, str):  # arguments given as a JSON string (the OpenAI wire format)
        try:
            args = json.loads(args)
        except ValueError:
            return fail(f"the arguments of '{_snippet(name)}' are a string that is not a JSON object", name)
    if not isinstance(args, dict):
        return fail(f"the arguments of '{_snippet(name)}' must be a JSON object", name)
    extra = sorted(k for k in obj if k not in ("name", "arguments"))
    if extra:
        return fail(f"unexpected key '{_snippet(extra[0])}' in the tool call (only name and arguments)", name)
    if schemas is not None:
        if name not in schemas:
            return fail(f"unknown tool '{_snippet(name)}'; available: {', '.join(sorted(schemas)) or '(none)'}", name)
        problem = validate_arguments(args, schemas[name])
        if problem is not None:
            return fail(f"bad arguments for '{name}': {problem}", name)
    return ToolCall(name, args, index, span)


def _snippet(text: str) -> str:
    text = str(text).strip()
    return text if len(text) <= MAX_ERROR_SNIPPET else text[:MAX_ERROR_SNIPPET] + "..."


def tool_message(result: ToolResult, name: str | None = None, *, embed_images: bool = False) -> dict:
    """A result as a ``tool`` message: its images (one ``{"type": "image"}`` placeholder each, in
    order, before the text) and its text (``"Error: ..."`` for an error). ``name``: the tool's,
    kept for logs (the template does not render it). ``embed_images``: each placeholder carries
    its PIL image (``{"type": "image", "image": im}``), for a processor's ``apply_chat_template``
    that loads the images from the messages; the rendered text is the same."""
    content: list[dict] = [
        {"type": "image", "image": im} if embed_images else {"type": "image"} for im in result.images
    ]
    text = result.model_text()
    if text or not content:
        content.append({"type": "text", "text": text})
    msg = {"role": "tool", "content": content}
    if name is not None:
        msg["name"] = name
    return msg


def assistant_message(content: str, calls: Sequence[ToolCall]) -> dict:
    """An assistant turn with tool calls, as the template expects it (to build trajectories
    from structured data, e.g. a warm-start set)."""
    return {"role": "assistant", "content": content, "tool_calls": [c.message() for c in calls]}


# --------------------------------------------------------------------------- rendering


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    """transformers' ``tojson`` filter (jinja2's own escapes <, >, & and ' for HTML)."""
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@lru_cache(maxsize=8)
def _compiled(template: str):
    """``template`` compiled the way transformers' ``apply_chat_template`` compiles it: a
    sandboxed environment with trim_blocks and lstrip_blocks, and its ``tojson``."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.filters["tojson"] = _tojson
    return env.from_string(template)


def render(
    messages: Sequence[Mapping],
    tools: Sequence[Mapping] | None = None,
    *,
    add_generation_prompt: bool = False,
    chat_template: str = TOOL_CHAT_TEMPLATE,
) -> str:
    """``messages`` rendered by ``chat_template`` (what the tokenizer's ``apply_chat_template``
    returns with ``tokenize=False``), without needing a tokenizer."""
    return _compiled(chat_template).render(
        messages=list(messages), tools=list(tools) if tools else None, add_generation_prompt=add_generation_prompt
    )


_SENTINEL = "\x00apo-rl-assistant\x00"


def tool_turn_text(results: Sequence[ToolResult | dict], chat_template: str = TOOL_CHAT_TEMPLATE) -> str:
    """The text that follows an assistant turn's ``<|im_end|>`` when ``results`` answer its calls,
    up to and including the next ``<|im_start|>assistant\\n``.

    Rendered by the template itself: ``[assistant(S), *tool messages]`` with the generation
    prompt, cut after ``S<|im_end|>`` (S a sentinel), so that the trajectory built turn by
    turn is the text the template renders for the whole conversation. ``results``: ToolResults
    or ready ``tool`` messages.
    """
    msgs = [r if isinstance(r, Mapping) else tool_message(r) for r in results]
    text = render(
        [{"role": "assistant", "content": _SENTINEL}, *msgs], add_generation_prompt=True, chat_template=chat_template
    )
    cut = text.index(_SENTINEL) + len(_SENTINEL)
    end_of_turn = "<|im_end|>"
    if not text.startswith(end_of_turn, cut):
        raise ValueError("the chat template does not close an assistant turn with <|im_end|> right after its content")
    return text[cut + len(end_of_turn) :]


__all__ = [
    "TOOL_CHAT_TEMPLATE",
    "ParsedCompletion",
    "ToolCall",
    "ToolCallError",
    "assistant_message",
    "parse_tool_calls",
    "render",
    "tool_message",
    "tool_turn_text",
]
