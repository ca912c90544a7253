"""Loading policy, frozen reference and processor from a config.

``model.name_or_path`` is a hub id (``Qwen/Qwen2.5-VL-3B-Instruct``), a local folder, or a
built-in tiny model (``tiny:qwen2_5_vl``, ``tiny:qwen2``, with ``-sft`` for the warm-started
variant, e.g. ``tiny:qwen2_5_vl-sft``) that is built locally and cached.

A local folder is checked before anything loads (:func:`check_model_folder`), so a folder that
lacks a part fails at start with one line naming the missing file. Any Qwen2-VL / Qwen2.5-VL
folder that transformers writes loads, with or without torchvision (see :func:`load_processor`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from framework.errors import ConfigError, ModelNotFoundError
from framework.models.tiny import resolve_tiny

__all__ = [
    "DTYPES",
    "ModelBundle",
    "ModelNotFoundError",  # raised here, importable from here
    "check_model_folder",
    "check_model_options",
    "check_state_matches",
    "load_model",
    "load_model_bundle",
    "load_processor",
    "resolve_path",
]

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}

WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
TOKENIZER_FILES = (("tokenizer.json",), ("vocab.json", "merges.txt"), ("tokenizer.model",))
VISION_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")
# the processors this module can build from their parts when AutoProcessor cannot
PROCESSOR_CLASSES = {"qwen2_5_vl": "Qwen2_5_VLProcessor", "qwen2_vl": "Qwen2VLProcessor"}


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


# ------------------------------------------------------------------ where the model is
def resolve_path(name_or_path: str, data_cfg: Any = None) -> str:
    """Turn ``tiny:...`` into a built folder; check that a local path or hub id exists and
    holds a config.json (the other parts are checked where they load: :func:`load_model_bundle`,
    :func:`load_model`)."""
    if name_or_path.startswith("tiny:"):
        return str(resolve_tiny(name_or_path))
    p = Path(os.path.expanduser(name_or_path))
    if p.exists():
        check_model_folder(p, weights=False, processor=False)
        return str(p)
    if _looks_local(name_or_path):
        raise ModelNotFoundError(f"model path '{name_or_path}' does not exist")
    path = _download(name_or_path)
    check_model_folder(path, weights=False, processor=False)
    return path


def _looks_local(name_or_path: str | Path) -> bool:
    """A path (rather than a hub id ``org/name``): it exists or is written as a path."""
    s = str(name_or_path)
    return Path(os.path.expanduser(s)).exists() or s.startswith((".", "/", "~"))


def _download(hub_id: str) -> str:
    """The hub model's folder in the local cache, downloaded if needed (configs, weights,
    tokenizer and chat template only)."""
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(hub_id, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"])
    except Exception as e:
        raise ModelNotFoundError(
            f"model '{hub_id}' could not be found locally or downloaded ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}). Download it on a machine with access "
            f"(`huggingface-cli download {hub_id} --local-dir /path/to/model`) and point at the "
            f"copy with model.name_or_path=/path/to/model, or set HF_HOME to a cache that holds it."
        ) from None


# ------------------------------------------------------------------ is the folder complete
def check_model_folder(path: str | Path, *, weights: bool = True, processor: bool = True) -> None:
    """Fail before any weights load when a model folder lacks a part (config, weights,
    tokenizer, a VL model's image processor config), with one line naming the folder, the
    missing file(s) and the fix: otherwise the run dies minutes later deep in transformers."""
    p = Path(os.path.expanduser(str(path)))
    if not p.is_dir():
        raise ModelNotFoundError(f"model path '{path}' does not exist (or is not a folder)")
    checks = [_missing_config]
    if weights:
        checks.append(_missing_weights)
    if processor:
        checks += [_missing_tokenizer, _missing_chat_template, _missing_image_processor]
    for check in checks:
        problem = check(p)
        if problem:
            raise ModelNotFoundError(f"model folder '{p}' {problem}")


def _missing_config(p: Path) -> str | None:
    if (p / "config.json").exists():
        return None
    return (
        "has no config.json: is it a Hugging Face model folder? Point model.name_or_path at the "
        "folder that `model.save_pretrained` wrote"
    )


def _missing_weights(p: Path) -> str | None:
    """No weight file, or a sharded checkpoint whose index names shards that are not there."""
    found = [f for f in WEIGHT_FILES if (p / f).exists()]
    if not found:
        return (
            f"has no weights ({', '.join(WEIGHT_FILES)}): save the model into it with "
            "`model.save_pretrained(folder)` or copy the weight files from the original model"
        )
    index = next((f for f in found if f.endswith(".index.json")), None)
    if index is None:
        files = [f for f in found if f.endswith(".safetensors")]
    else:
        shards = sorted(set(json.loads((p / index).read_text()).get("weight_map", {}).values()))
        absent = [s for s in shards if not (p / s).exists()]
        if absent:
            return (
                f"lacks the weight shard(s) {', '.join(absent)} that {index} lists: copy them from the "
                "original model (an interrupted download or copy?)"
            )
        files = [s for s in shards if s.endswith(".safetensors")]
    for f in files:
        problem = safetensors_problem(p / f)
        if problem:
            return f"has a damaged weight file {f}: {problem}; copy it again from the original model"
    return None


def safetensors_problem(f: Path) -> str | None:
    """What is wrong with the safetensors file ``f`` judged from its header alone (no tensor is
    read): a header that is not one, or a file shorter than the tensors it declares (a truncated
    download or copy). None when it is whole."""
    size = f.stat().st_size
    with open(f, "rb") as fh:
        head = fh.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n <= 0 or 8 + n > size or n > 100 * 2**20:
            return f"it is {size:,} bytes and has no valid safetensors header (truncated or not a safetensors file?)"
        try:
            header = json.loads(fh.read(n))
        except (ValueError, UnicodeDecodeError):
            return "its safetensors header is not valid JSON (truncated or damaged?)"
    ends = [v.get("data_offsets", [0, 0])[1] for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)]
    need = 8 + n + max(ends, default=0)
    if size < need:
        return f"it is {size:,} bytes but its header declares {need:,} (truncated: an interrupted download or copy?)"
    return None


def _missing_tokenizer(p: Path) -> str | None:
    if any(all((p / f).exists() for f in files) for files in TOKENIZER_FILES):
        return None
    return (
        "has no tokenizer files (tokenizer.json, or vocab.json + merges.txt): save them into it with "
        "`processor.save_pretrained(folder)` (or `tokenizer.save_pretrained(folder)`) or copy them "
        "from the base model"
    )


def _missing_chat_template(p: Path) -> str | None:
    """Every prompt goes through the chat template, so a folder without one cannot be run."""
    if _read_chat_template(p) is not None or "chat_template" in _read_json(p / "tokenizer_config.json"):
        return None
    return (
        "has no chat template (chat_template.jinja, chat_template.json or chat_template in "
        "tokenizer_config.json): copy chat_template.jinja from the instruct model it comes from"
    )


def _missing_image_processor(p: Path) -> str | None:
    """A VL model needs its image processor's config: ``preprocessor_config.json`` (the hub's
    and older transformers' layout) or an ``image_processor`` entry in ``processor_config.json``
    (what transformers 5's ``processor.save_pretrained`` writes)."""
    if "vision_config" not in _read_json(p / "config.json"):
        return None
    if (p / "preprocessor_config.json").exists() or "image_processor" in _read_json(p / "processor_config.json"):
        return None
    return (
        "is a vision-language model but has no preprocessor_config.json (nor an image_processor entry "
        "in processor_config.json): save the processor into it with `processor.save_pretrained(folder)` "
        "or copy preprocessor_config.json from the base model"
    )


def _read_json(f: Path) -> dict:
    """A JSON file's object, or ``{}`` when the file is absent."""
    return json.loads(f.read_text()) if f.exists() else {}


def _read_chat_template(p: Path) -> str | None:
    """The chat template saved next to the tokenizer (transformers 5: ``chat_template.jinja``;
    older processors: ``chat_template.json``), or None."""
    if (p / "chat_template.jinja").exists():
        return (p / "chat_template.jinja").read_text()
    return _read_json(p / "chat_template.json").get("chat_template")


# ------------------------------------------------------------------ tokenizer and processor
def _is_vl_config(path: str) -> bool:
    from transformers import AutoConfig

    return hasattr(AutoConfig.from_pretrained(path), "vision_config")


def load_processor(path: str):
    """Processor for a VL model, the tokenizer for a text-only model (returned twice). Padding
    is on the left for generation.

    AutoProcessor is asked first and its answer checked, not trusted: without torchvision it
    raises (Qwen2-VL's video processor needs it), and for a ``processor_class`` it does not know
    it silently returns the bare tokenizer. Then the processor is built from its parts: the
    tokenizer, the slow (PIL) image processor and the chat template."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    tok.padding_side = "left"
    if not _is_vl_config(path):
        _ensure_chat_template(tok, path)
        return tok, tok
    proc = _auto_processor(path) or _processor_from_parts(path, tok)
    proc.tokenizer.padding_side = "left"
    _ensure_chat_template(proc.tokenizer, path, getattr(proc, "chat_template", None))
    return proc, proc.tokenizer


def _auto_processor(path: str):
    """AutoProcessor's processor when it is a usable VL processor (an image processor and a
    tokenizer), else None."""
    from transformers import AutoProcessor

    try:
        proc = AutoProcessor.from_pretrained(path)
    except Exception:  # e.g. ImportError: torchvision is missing
        return None
    if getattr(proc, "image_processor", None) is None or getattr(proc, "tokenizer", None) is None:
        return None
    return proc


def _processor_from_parts(path: str, tok):
    """A Qwen2-VL / Qwen2.5-VL processor built from the tokenizer, the slow (PIL) image
    processor (which reads ``preprocessor_config.json`` or ``processor_config.json``, whatever
    image processor class they name) and the chat template; no video processor."""
    import transformers
    from transformers import AutoConfig
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    model_type = AutoConfig.from_pretrained(path).model_type
    if model_type not in PROCESSOR_CLASSES:
        raise ModelNotFoundError(
            f"the processor of '{path}' (model_type {model_type}) could not be loaded with AutoProcessor "
            f"and only {' / '.join(sorted(PROCESSOR_CLASSES))} processors can be built from their parts: "
            "install torchvision, or check the folder's processor_config.json / preprocessor_config.json"
        )
    cls = getattr(transformers, PROCESSOR_CLASSES[model_type])
    ip = Qwen2VLImageProcessorPil.from_pretrained(path)
    template = tok.chat_template or _read_chat_template(Path(path))
    return _image_only(cls)(image_processor=ip, tokenizer=tok, chat_template=template)


def _ensure_chat_template(tok, path: str, fallback: str | None = None) -> None:
    """Prompts are rendered with ``tokenizer.apply_chat_template``: give the tokenizer the
    processor's (or the folder's) chat template when it was saved apart from the tokenizer
    (``chat_template.json``)."""
    if tok.chat_template is None:
        tok.chat_template = fallback or _read_chat_template(Path(path))


def _image_only(cls):
    """``cls`` (a Qwen2/2.5-VL processor) without its video processor, which needs torchvision.
    It keeps ``cls``'s name, so that ``save_pretrained`` writes a ``processor_class`` that
    transformers knows (an unknown one makes AutoProcessor return the bare tokenizer)."""
    from transformers.processing_utils import ProcessorMixin

    class ImageOnlyProcessor(cls):
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            self.image_token = getattr(tokenizer, "image_token", None) or "<|image_pad|>"
            self.video_token = getattr(tokenizer, "video_token", None) or "<|video_pad|>"
            self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
            self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

    ImageOnlyProcessor.__name__ = cls.__name__
    ImageOnlyProcessor.__qualname__ = f"ImageOnly{cls.__name__}"
    return ImageOnlyProcessor


# ------------------------------------------------------------------ options against the model
def check_model_options(path: str, m: Any) -> None:
    """``model.*`` options that depend on the model at ``path`` (its config.json only, no
    weight loads) or on this machine: ``freeze_vision_tower`` on a text-only model, a FlashAttention
    implementation without a CUDA GPU or without its package. One-line :class:`ConfigError`."""
    if getattr(m, "freeze_vision_tower", False) and not _is_vl_config(path):
        raise ConfigError(
            f"model.freeze_vision_tower=true but model.name_or_path={m.name_or_path} is a text-only model "
            "(no vision tower to freeze): drop model.freeze_vision_tower"
        )
    impl = getattr(m, "attn_implementation", None)
    if isinstance(impl, str) and impl.startswith("flash_attention"):
        import importlib.util

        if not torch.cuda.is_available():
            raise ConfigError(
                f"model.attn_implementation={impl} needs a CUDA GPU and this machine has none: "
                "use model.attn_implementation=sdpa (the same attention)"
            )
        if impl == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
            raise ConfigError(
                f"model.attn_implementation={impl} needs the flash-attn package, which is not installed here "
                "(pip install flash-attn --no-build-isolation), or use model.attn_implementation=sdpa"
            )


def check_state_matches(state_path: str | Path, expected: Any, *, what: str, model: str) -> None:
    """The weights in Lightning checkpoint ``state_path`` (``state.ckpt``) against the state dict
    ``expected`` of the model built for the run: the same names and shapes, or one
    :class:`ConfigError` naming the first difference (a checkpoint of another model). Read with
    ``mmap`` (no tensor is loaded) and ``weights_only`` (no code runs). ``what``: how the user
    named the checkpoint (``resume=...``); ``model``: the run's model."""
    try:
        ck = torch.load(str(state_path), map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ConfigError(
            f"{what}: {state_path} cannot be read as a checkpoint ({type(e).__name__}: {msg[:200]}); "
            "resume from another checkpoint of the run"
        ) from None
    sd = ck.get("state_dict") if isinstance(ck, dict) else None
    if not isinstance(sd, dict):
        raise ConfigError(f"{what}: {state_path} holds no weights (no state_dict): not a checkpoint of an apo-rl run")
    only_there = sorted(k for k in sd if k not in expected)
    only_here = sorted(k for k in expected if k not in sd)
    shapes = [
        (k, tuple(sd[k].shape), tuple(v.shape))
        for k, v in expected.items()
        if k in sd and hasattr(sd[k], "shape") and tuple(sd[k].shape) != tuple(v.shape)
    ]
    if not (only_there or only_here or shapes):
        return
    if shapes:
        k, there, here = shapes[0]
        first = f"{k} is {list(there)} there and {list(here)} here"
    elif only_there:
        first = f"it holds {only_there[0]}, which this model has not"
    else:
        first = f"it lacks {only_here[0]}"
    counts = f"{len(shapes)} shape(s) differ, {len(only_there)} name(s) only there, {len(only_here)} only here"
    raise ConfigError(
        f"{what}: {state_path} holds the weights of another model than model.name_or_path={model} ({first}; "
        f"{counts}): resume with the model (and model.lora options) it was trained with, or from a checkpoint of this run"
    )


# ------------------------------------------------------------------ bundle and weights
def load_model_bundle(path: str) -> ModelBundle:
    """Tokenizer, processor and special token ids of the model at ``path``; a local folder is
    checked first (:func:`check_model_folder`), weights included, so that a run fails at start."""
    if _looks_local(path):
        check_model_folder(path)
    processor, tok = load_processor(path)
    eos = _eos_token_ids(path, tok)
    vocab = tok.get_vocab()
    return ModelBundle(
        path=path,
        is_vl=processor is not tok,
        processor=processor,
        tokenizer=tok,
        eos_token_ids=eos,
        pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else eos[0],
        vision_token_ids=[vocab[t] for t in VISION_TOKENS if t in vocab],
    )


def _eos_token_ids(path: str, tok) -> list[int]:
    """The generation config's end tokens, plus ``<|im_end|>`` and the tokenizer's eos: a
    chat model ends its turn with ``<|im_end|>`` whatever its generation config says."""
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
    return [e for e in eos if e is not None]


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
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    if dtype not in DTYPES:
        raise ValueError(f"model.dtype='{dtype}' is not supported; choose one of {sorted(DTYPES)}")
    if _looks_local(path):
        check_model_folder(path, processor=False)
    kw = dict(dtype=DTYPES[dtype])
    if attn_implementation:
        kw["attn_implementation"] = attn_implementation
    cls = AutoModelForImageTextToText if _is_vl_config(path) else AutoModelForCausalLM
    try:
        model = cls.from_pretrained(path, **kw)
    except (ValueError, ImportError) as e:
        if not (attn_implementation and (attn_implementation in str(e) or "attention" in str(e).lower())):
            raise
        msg = " ".join(str(e).split())
        raise ConfigError(
            f"model.attn_implementation={attn_implementation} cannot be used with {path}: {msg[:300]} "
            "(model.attn_implementation=sdpa works everywhere)"
        ) from e
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
            raise ConfigError(
                f"model.freeze_vision_tower=true but {path} is a text-only model (no vision tower to freeze): "
                "drop model.freeze_vision_tower"
            )
        vis.requires_grad_(False)
    return model
