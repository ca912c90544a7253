"""Model folders written by plain transformers calls load, with or without torchvision, and a
folder that lacks a part fails at start with a ModelNotFoundError naming the missing file.

The models are built here with transformers' config classes and ``save_pretrained`` only; the
tokenizer and image processor are the project's tiny ones, re-saved through transformers."""

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from framework.errors import ModelNotFoundError
from framework.models.loading import check_model_folder, load_model, load_model_bundle, resolve_path

CONFIGS = str(Path(__file__).resolve().parents[1] / "configs")
HAS_TORCHVISION = importlib.util.find_spec("torchvision") is not None
SIDE = 56  # a 56x56 image: a 4x4 grid of 14-pixel patches, merged 2x2 -> 4 placeholder tokens


# ------------------------------------------------------------------ building folders
@pytest.fixture(scope="module")
def tokenizer(tiny_vl_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_vl_path)


def _ids(tok) -> dict:
    names = ("<|endoftext|>", "<|im_end|>", "<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")
    return {t: tok.convert_tokens_to_ids(t) for t in names}


def _text_config(tok, **extra) -> dict:
    ids = _ids(tok)
    return dict(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [4, 6, 6]},
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
        **extra,
    )


def _special_ids(tok) -> dict:
    ids = _ids(tok)
    return dict(
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )


def save_qwen2_5_vl(d: Path, tok, **save_kw) -> None:
    """A tiny random Qwen2.5-VL, as ``Qwen2_5_VLForConditionalGeneration.save_pretrained`` writes it."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64)
    vision |= dict(
        patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56, fullatt_block_indexes=[0]
    )
    cfg = Qwen2_5_VLConfig(
        text_config=_text_config(tok), vision_config=vision, tie_word_embeddings=True, **_special_ids(tok)
    )
    torch.manual_seed(0)
    Qwen2_5_VLForConditionalGeneration(cfg).save_pretrained(d, **save_kw)


def save_qwen2_vl(d: Path, tok) -> None:
    """A tiny random Qwen2-VL, as ``Qwen2VLForConditionalGeneration.save_pretrained`` writes it."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    vision = dict(depth=1, embed_dim=32, hidden_size=64, mlp_ratio=2, num_heads=2)
    vision |= dict(patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
    cfg = Qwen2VLConfig(
        text_config=_text_config(tok), vision_config=vision, tie_word_embeddings=True, **_special_ids(tok)
    )
    torch.manual_seed(0)
    Qwen2VLForConditionalGeneration(cfg).save_pretrained(d)


def _edit_json(f: Path, **changes) -> None:
    f.write_text(json.dumps({**json.loads(f.read_text()), **changes}, indent=2))


def processor_save(d: Path, tiny_vl_path: str) -> None:
    """transformers 5's ``processor.save_pretrained``: tokenizer files, chat_template.jinja and a
    processor_config.json holding the image processor (no preprocessor_config.json)."""
    if HAS_TORCHVISION:
        from transformers import AutoProcessor

        AutoProcessor.from_pretrained(tiny_vl_path).save_pretrained(d)
    else:  # Qwen2_5_VLProcessor needs a video processor, which needs torchvision
        load_model_bundle(tiny_vl_path).processor.save_pretrained(d)


def unknown_processor_class(d: Path, tiny_vl_path: str) -> None:
    """A processor_class that AutoProcessor does not know (what this project's image-only
    processor once wrote): AutoProcessor then returns the bare tokenizer."""
    processor_save(d, tiny_vl_path)
    _edit_json(d / "processor_config.json", processor_class="ImageOnlyQwen2_5_VLProcessor")
    _edit_json(d / "tokenizer_config.json", processor_class="ImageOnlyQwen2_5_VLProcessor")


def hub_layout(d: Path, tiny_vl_path: str, processor_class: str = "Qwen2_5_VLProcessor") -> None:
    """The hub's (and transformers 4's) layout: preprocessor_config.json naming the fast image
    processor, chat_template.json, tokenizer files."""
    from transformers import AutoTokenizer
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tok = AutoTokenizer.from_pretrained(tiny_vl_path)
    template = tok.chat_template
    tok.chat_template = None
    tok.save_pretrained(d)
    Qwen2VLImageProcessorPil.from_pretrained(tiny_vl_path).save_pretrained(d)
    _edit_json(
        d / "preprocessor_config.json",
        image_processor_type="Qwen2VLImageProcessorFast",
        processor_class=processor_class,
    )
    _edit_json(d / "tokenizer_config.json", processor_class=processor_class)
    (d / "chat_template.json").write_text(json.dumps({"chat_template": template}))
    assert not (d / "chat_template.jinja").exists()


LAYOUTS = {"processor_save": processor_save, "unknown_processor_class": unknown_processor_class, "hub": hub_layout}


@pytest.fixture(scope="module")
def folders(tmp_path_factory, tiny_vl_path, tokenizer):
    """One Qwen2.5-VL folder per processor layout, plus a Qwen2-VL one (hub layout)."""
    out = {}
    for name, write_processor in LAYOUTS.items():
        d = tmp_path_factory.mktemp(name)
        save_qwen2_5_vl(d, tokenizer)
        write_processor(d, tiny_vl_path)
        out[name] = d
    d = out["qwen2_vl"] = tmp_path_factory.mktemp("qwen2_vl")
    save_qwen2_vl(d, tokenizer)
    hub_layout(d, tiny_vl_path, processor_class="Qwen2VLProcessor")
    return out


def encode_one_image(bundle):
    from conftest import make_image

    from framework.rollout.inputs import encode_prompts

    rec = {"question": "How many shapes are in the image?", "answer": "1", "images": [make_image(SIDE, 0)]}
    return encode_prompts(bundle, [rec]).inputs


# ------------------------------------------------------------------ (a) they load
@pytest.mark.parametrize("layout", [*LAYOUTS, "qwen2_vl"])
def test_plain_transformers_folder_loads(folders, layout):
    d = folders[layout]
    bundle = load_model_bundle(str(d))
    assert bundle.is_vl and bundle.processor is not bundle.tokenizer
    assert getattr(bundle.processor, "image_processor", None) is not None
    want = "Qwen2VLProcessor" if layout == "qwen2_vl" else "Qwen2_5_VLProcessor"
    assert type(bundle.processor).__name__ == want
    assert bundle.tokenizer.padding_side == "left" and bundle.tokenizer.chat_template
    assert bundle.tokenizer.convert_tokens_to_ids("<|im_end|>") in bundle.eos_token_ids

    inputs = encode_one_image(bundle)  # encode_prompts checks the count against the grid too
    image_id = bundle.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert inputs["image_grid_thw"].tolist() == [[1, SIDE // 14, SIDE // 14]]
    assert int((inputs["input_ids"] == image_id).sum()) == (SIDE // 28) ** 2

    model = load_model(str(d), "float32", trainable=False)
    with torch.no_grad():
        out = model(**inputs)
    assert out.logits.shape[:2] == inputs["input_ids"].shape


def test_unknown_processor_class_is_the_reported_failure(folders):
    """Without torchvision AutoProcessor silently answers with the tokenizer for this folder."""
    if HAS_TORCHVISION:
        pytest.skip("with torchvision AutoProcessor raises instead; the load is tested above")
    from transformers import AutoProcessor

    assert not hasattr(AutoProcessor.from_pretrained(folders["unknown_processor_class"]), "image_processor")


def test_saving_the_bundle_processor_writes_a_known_processor_class(folders, tmp_path):
    bundle = load_model_bundle(str(folders["hub"]))
    bundle.processor.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "processor_config.json").read_text())["processor_class"] == "Qwen2_5_VLProcessor"


# ------------------------------------------------------------------ (b) a run trains from one
def test_two_step_training_run_from_a_plain_transformers_folder(folders, tmp_path):
    from framework.train import train

    overrides = [
        f"output_dir={tmp_path}",
        f"model.name_or_path={folders['unknown_processor_class']}",
        "trainer.max_steps=2",
        "trainer.prompts_per_step=4",
        "rollout.group_size=4",
        "rollout.max_new_tokens=16",  # a random model never stops: keep its completions short
        "trainer.eval_every=0",
        "trainer.eval_size=4",
        "logger.wandb=false",
        "trainer.progress_bar=false",
    ]
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    res = train(cfg)
    assert len(res.metric("reward")) == 2


# ------------------------------------------------------------------ (c) a missing part fails at start
MISSING = {  # layout, files removed, what the message must name
    "config": ("hub", ["config.json"], "config.json"),
    "weights": ("hub", ["model.safetensors"], "model.safetensors"),
    "tokenizer": ("hub", ["tokenizer.json", "tokenizer_config.json"], "tokenizer.json"),
    "preprocessor": ("hub", ["preprocessor_config.json"], "preprocessor_config.json"),
    "processor_config": ("processor_save", ["processor_config.json"], "preprocessor_config.json"),
    "chat_template": ("processor_save", ["chat_template.jinja"], "chat template"),
}


@pytest.fixture
def no_weight_loading(monkeypatch):
    """Any attempt to load weights fails the test: the checks must come first."""
    import transformers

    def refuse(*a, **k):
        raise AssertionError("weights were loaded before the folder was checked")

    for name in ("AutoModelForImageTextToText", "AutoModelForCausalLM"):
        monkeypatch.setattr(getattr(transformers, name), "from_pretrained", refuse)


def _copy_without(src: Path, dst: Path, files: list[str]) -> Path:
    shutil.copytree(src, dst)
    for f in files:
        (dst / f).unlink()
    return dst


@pytest.mark.parametrize("case", list(MISSING))
def test_missing_part_fails_at_start_naming_the_file(folders, tmp_path, no_weight_loading, case):
    layout, removed, named = MISSING[case]
    d = _copy_without(folders[layout], tmp_path / "model", removed)
    loads = [check_model_folder, load_model_bundle]
    loads += [load_model] if case in ("config", "weights") else []
    loads += [resolve_path] if case == "config" else []  # the rest is checked where it loads
    for load in loads:
        with pytest.raises(ModelNotFoundError) as ei:
            load(str(d))
        msg = str(ei.value)
        assert named in msg and str(d) in msg and "\n" not in msg, (load.__name__, msg)


def test_missing_weight_shard_is_named(tmp_path, tiny_vl_path, tokenizer, no_weight_loading):
    d = tmp_path / "sharded"
    save_qwen2_5_vl(d, tokenizer, max_shard_size="300KB")
    hub_layout(d, tiny_vl_path)
    shards = sorted(d.glob("model-*.safetensors"))
    assert len(shards) > 1 and (d / "model.safetensors.index.json").exists()
    shards[-1].unlink()
    with pytest.raises(ModelNotFoundError, match=shards[-1].name):
        load_model_bundle(str(d))
