"""Loading policy, frozen reference and processor from a config.

``model.name_or_path`` is a hub id (``Qwen/Qwen2.5-VL-3B-Instruct``), a local folder, or a
built-in tiny model (``tiny:qwen2_5_vl``, ``tiny:qwen2``, with ``-sft`` for the warm-started
variant, e.g. ``tiny:qwen2_5_vl-sft``) that is built locally and cached.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from framework.errors import ModelNotFoundError  # noqa: F401  (raised here, importable from here)

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


@dataclass
class ModelBundle:
    """What the rest of the framework needs to know about a model."""

    path: str
    is_vl: bool
    processor: Any  # Qwen2_5_VLProcessor-like (VL) or the tokenizer (text-only)
    tokenizer: Any
    eos_token_ids: list[int]
    pad_token_id: int
    vision_token_ids: list[int]  # never to be sampled (pitfall 2)


def resolve_path(name_or_path: str, data_cfg: Any = None) -> str:
    """Turn ``tiny:...`` into a built folder; check that a local path or hub id exists."""
    if name_or_path.startswith("tiny:"):
        spec = name_or_path[len("tiny:") :]
        kind, _, variant = spec.partition("-")
        if variant == "sft":
            from framework.models.warmstart import build_warmstarted

            return str(build_warmstarted(kind))
        if variant:
            raise ValueError(f"unknown tiny model variant '{name_or_path}': use tiny:{kind} or tiny:{kind}-sft")
        from framework.models.tiny import build_tiny

        return str(build_tiny(kind))
    p = Path(os.path.expanduser(name_or_path))
    if p.exists():
        if not (p / "config.json").exists():
            raise ModelNotFoundError(f"model folder '{p}' has no config.json: is it a Hugging Face model folder?")
        return str(p)
    if name_or_path.startswith((".", "/", "~")):
        raise ModelNotFoundError(f"model path '{name_or_path}' does not exist")
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(
            name_or_path, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"]
        )
    except Exception as e:
        raise ModelNotFoundError(
            f"model '{name_or_path}' could not be found locally or downloaded ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}). Download it on a machine with access "
            f"(`huggingface-cli download {name_or_path} --local-dir /path/to/model`) and point at the "
            f"copy with model.name_or_path=/path/to/model, or set HF_HOME to a cache that holds it."
        ) from None


def _is_vl_config(path: str) -> bool:
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(path)
    return hasattr(cfg, "vision_config")


def load_processor(path: str):
    """Processor for a VL model, falling back to an image-only processor when torchvision is
    missing (transformers 5.x's AutoProcessor insists on a video processor); the tokenizer
    for a text-only model. Padding is on the left for generation."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    tok.padding_side = "left"
    if not _is_vl_config(path):
        return tok, tok
    try:
        from transformers import AutoProcessor

        proc = AutoProcessor.from_pretrained(path)
    except Exception:
        from transformers import AutoConfig, Qwen2_5_VLProcessor, Qwen2VLProcessor
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        ip = Qwen2VLImageProcessorPil.from_pretrained(path)
        cls = Qwen2_5_VLProcessor if AutoConfig.from_pretrained(path).model_type == "qwen2_5_vl" else Qwen2VLProcessor
        proc = _image_only(cls)(image_processor=ip, tokenizer=tok, chat_template=tok.chat_template)
    proc.tokenizer.padding_side = "left"
    return proc, proc.tokenizer


def _image_only(cls):
    """``cls`` (a Qwen2/2.5-VL processor) without its video processor, which needs torchvision."""
    from transformers.processing_utils import ProcessorMixin

    class ImageOnlyProcessor(cls):
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            self.image_token = getattr(tokenizer, "image_token", None) or "<|image_pad|>"
            self.video_token = getattr(tokenizer, "video_token", None) or "<|video_pad|>"
            self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
            self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

    ImageOnlyProcessor.__name__ = f"ImageOnly{cls.__name__}"
    return ImageOnlyProcessor


def load_model_bundle(path: str) -> ModelBundle:
    processor, tok = load_processor(path)
    is_vl = processor is not tok
    from transformers import GenerationConfig

    eos = []
    try:
        gc = GenerationConfig.from_pretrained(path)
        eos = gc.eos_token_id if isinstance(gc.eos_token_id, list) else [gc.eos_token_id]
    except Exception:
        pass
    for t in ("<|im_end|>", tok.eos_token):
        i = tok.convert_tokens_to_ids(t) if t else None
        if i is not None and i != tok.unk_token_id and i not in eos:
            eos.append(i)
    eos = [e for e in eos if e is not None]
    vocab = tok.get_vocab()
    vision = [
        vocab[t]
        for t in ("<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")
        if t in vocab
    ]
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos[0]
    return ModelBundle(
        path=path,
        is_vl=is_vl,
        processor=processor,
        tokenizer=tok,
        eos_token_ids=eos,
        pad_token_id=pad,
        vision_token_ids=vision,
    )


def load_model(
    path: str,
    dtype: str = "float32",
    *,
    trainable: bool = True,
    gradient_checkpointing: bool = False,
    freeze_vision_tower: bool = False,
    attn_implementation: str | None = "sdpa",
):
    """Policy (trainable) or frozen reference (``trainable=False``: eval mode, no grads)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    if dtype not in DTYPES:
        raise ValueError(f"model.dtype='{dtype}' is not supported; choose one of {sorted(DTYPES)}")
    kw = dict(dtype=DTYPES[dtype])
    if attn_implementation:
        kw["attn_implementation"] = attn_implementation
    cls = (
        AutoModelForImageTextToText
        if hasattr(AutoConfig.from_pretrained(path), "vision_config")
        else AutoModelForCausalLM
    )
    model = cls.from_pretrained(path, **kw)
    if not trainable:
        model.eval()
        model.requires_grad_(False)
        return model
    model.train()
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if freeze_vision_tower:
        vis = getattr(getattr(model, "model", model), "visual", None)
        if vis is None:
            raise ValueError("model.freeze_vision_tower=true but the model has no vision tower")
        vis.requires_grad_(False)
    return model
