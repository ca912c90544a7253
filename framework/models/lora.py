"""LoRA adapters with ``peft`` (``model.lora.*``, :class:`framework.config.LoraOptions`).

The policy stays the Hugging Face model: :func:`apply_lora` wraps it with
``peft.get_peft_model`` (or ``PeftModel.from_pretrained`` for ``model.lora.path``), which
replaces the targeted linear layers in place by LoRA layers, and keeps the ``PeftModel``
beside it (:func:`peft_model`, not a submodule). Everything that runs the policy (generation,
log-probs, FSDP sharding, the optimizer) sees the same modules as for full weights, now with
only the adapters trainable:

    parameters      ``<module>.base_layer.weight`` (frozen), ``<module>.lora_A.default.weight``,
                    ``<module>.lora_B.default.weight`` (trained, in model.master_dtype); the base
                    model is loaded in the compute dtype (model.dtype): it is never stepped
    reference       the policy with its adapters disabled (``PeftModel.disable_adapter()``,
                    :func:`reference_model`): no second copy of the weights
    vLLM sync       :func:`merged_weights`: W + peft's ``get_delta_weight`` for every adapted
                    layer, out of place, under the base model's names (``base_model.model.``
                    and ``.base_layer`` stripped), together with the other parameters of the
                    module that holds it (vLLM fuses q/k/v and gate/up into one layer and
                    reloads a fused layer whole). Merging in place (``merge_adapter`` then
                    ``unmerge_adapter``) would round W + d - d back to a W that is not
                    bit-identical, a drift of the frozen weights at every sync.
    checkpoint      ``policy/``: the adapter (``PeftModel.save_pretrained``: adapter_config.json
                    + adapter_model.safetensors, loadable with ``PeftModel.from_pretrained``);
                    ``merged/`` with model.lora.export_merged: the base with the adapters
                    merged, a plain Hugging Face model folder (:func:`save_checkpoint_policy`).

Options are checked against the model's architecture before any weight loads
(:func:`check_lora`, on a ``meta``-device model): a target that matches nothing, vision=true
for a text-only model, an adapter folder that is not one.
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path
from typing import Any

import torch

from framework.errors import ConfigError, DependencyError

log = logging.getLogger(__name__)

ADAPTER = "default"  # peft's adapter name
VISION = r"(.*\.)?visual\..*"  # the vision tower's modules (Qwen2-VL / Qwen2.5-VL: model.visual)
ADAPTER_CONFIG = "adapter_config.json"
MERGED = "merged"  # the merged export's folder in a checkpoint


def import_peft():
    try:
        import peft
    except ImportError as e:
        raise DependencyError(
            f"model.lora.enabled=true needs peft, which is not importable here ({e}): pip install peft==0.21.2 (a dependency of apo-rl: pip install -e .)"
        ) from e
    return peft


# ----------------------------------------------------------------------------- config
def peft_config(opts, *, vision_tower: bool = True):
    """peft's ``LoraConfig`` for ``model.lora`` (the vision tower, if the model has one, excluded
    unless ``vision``)."""
    peft = import_peft()
    targets = opts.target_modules
    targets = targets if isinstance(targets, str) else [str(t) for t in targets]
    return peft.LoraConfig(
        r=int(opts.r),
        lora_alpha=opts.alpha,
        lora_dropout=float(opts.dropout),
        target_modules=targets,
        exclude_modules=VISION if vision_tower and not opts.vision else None,
        init_lora_weights=opts.init_lora_weights,
        use_rslora=bool(opts.use_rslora),
        bias="none",
    )


def adapter_folder_config(path: str):
    """The ``LoraConfig`` stored in adapter folder ``path`` (``model.lora.path``)."""
    p = Path(str(path)).expanduser()
    if not (p / ADAPTER_CONFIG).is_file():
        raise ConfigError(
            f"model.lora.path={path}: no {ADAPTER_CONFIG} there; point it at a folder written by "
            "PeftModel.save_pretrained (a checkpoint's policy/ folder of a LoRA run)"
        )
    peft = import_peft()
    cfg = peft.PeftConfig.from_pretrained(str(p))
    if cfg.peft_type != peft.PeftType.LORA:
        raise ConfigError(f"model.lora.path={path} holds a {cfg.peft_type} adapter, not a LoRA adapter")
    return cfg


def _meta_model(model_cfg):
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    cls = AutoModelForImageTextToText if hasattr(model_cfg, "vision_config") else AutoModelForCausalLM
    with torch.device("meta"):
        return cls.from_config(model_cfg)


def _adapted(model) -> list[tuple[str, torch.nn.Module]]:
    from peft.tuners.lora import LoraLayer

    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)]


def check_lora(path: str, opts) -> int:
    """Check ``model.lora`` against the architecture of the model at ``path`` without loading a
    weight (the model is built on the meta device and wrapped there); returns the number of
    adapter parameters. One-line :class:`ConfigError` naming the option and the fix."""
    from transformers import AutoConfig

    return lora_param_count(AutoConfig.from_pretrained(path), opts, name=path)


def lora_param_count(model_cfg, opts, *, name: str = "the model") -> int:
    """:func:`check_lora` for a model config (e.g. ``framework.models.architectures.get``):
    the number of adapter parameters ``opts`` gives this architecture, checked as there."""
    path = name
    is_vl = hasattr(model_cfg, "vision_config")
    if opts.vision and not is_vl:
        raise ConfigError(
            f"model.lora.vision=true but {path} is a text-only model (no vision tower): drop model.lora.vision"
        )
    peft = import_peft()
    cfg = adapter_folder_config(opts.path) if opts.path else peft_config(opts, vision_tower=is_vl)
    model = _meta_model(model_cfg)
    head = model.get_output_embeddings()
    linear = sorted(
        {
            n.rsplit(".", 1)[-1]
            for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and "visual" not in n and m is not head
        }
    )
    where = f"model.lora.path={opts.path}" if opts.path else f"model.lora.target_modules={opts.target_modules!r}"
    try:
        with warnings_as_errors():
            wrapped = peft.get_peft_model(model, cfg)
    except (ValueError, RuntimeError, UserWarning):
        raise ConfigError(
            f"{where} matches no layer of {path}: its language model's linear layers are {', '.join(linear)} "
            "(or use all-linear)"
        ) from None
    adapted = _adapted(wrapped)
    in_vision = [n for n, _ in adapted if "visual" in n]
    if not adapted or (not opts.path and len(in_vision) == len(adapted)):
        raise ConfigError(
            f"{where} adapts no layer of the language model of {path}: its linear layers are {', '.join(linear)} "
            "(or use all-linear)"
        )
    if opts.vision and not in_vision:
        raise ConfigError(
            f"model.lora.vision=true but {where} matches no layer of the vision tower: use all-linear or name "
            "the vision tower's layers too (qkv, proj, ...)"
        )
    return sum(p.numel() for n, p in wrapped.named_parameters() if "lora_" in n)


@contextlib.contextmanager
def warnings_as_errors():
    """peft warns (instead of failing) on some targets that match nothing: treat that as an error."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*(not found|No modules were targeted|did not match).*")
        yield


# ----------------------------------------------------------------------------- the policy
def apply_lora(
    model, opts, *, adapter_dtype: torch.dtype, gradient_checkpointing: bool = False, seed: int | None = None
):
    """Wrap ``model`` (loaded, trainable) with LoRA adapters in place and return it: only the
    adapters require gradients; they are cast to ``adapter_dtype`` (the master dtype). ``seed``:
    the random initialisation of the adapters is drawn from this seed alone, so that every rank
    draws the same adapters whatever it did before (FSDP shards each rank's own copy; different
    copies would stitch together an adapter no single process would have drawn)."""
    peft = import_peft()
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        if opts.path:
            pm = peft.PeftModel.from_pretrained(model, str(Path(opts.path).expanduser()), is_trainable=True)
        else:
            pm = peft.get_peft_model(model, peft_config(opts, vision_tower=hasattr(model.config, "vision_config")))
    hf = pm.get_base_model()
    for _, m in _adapted(hf):
        for d in (m.lora_A, m.lora_B):
            d[ADAPTER].to(adapter_dtype)
    if gradient_checkpointing and hasattr(hf, "enable_input_require_grads"):
        hf.enable_input_require_grads()  # the frozen embedding's output must carry a gradient path
    hf.__dict__["_apo_peft"] = pm  # beside the model, not a submodule (no cycle in modules())
    n = sum(p.numel() for p in hf.parameters() if p.requires_grad)
    log.info(
        "apo-rl: LoRA r=%s alpha=%s on %d layers: %s trainable parameters of %s",
        pm.peft_config[ADAPTER].r,
        pm.peft_config[ADAPTER].lora_alpha,
        len(_adapted(hf)),
        f"{n:,}",
        f"{sum(p.numel() for p in hf.parameters()):,}",
    )
    return hf


def is_lora(model) -> bool:
    return model is not None and "_apo_peft" in getattr(model, "__dict__", {})


def peft_model(model):
    """The ``PeftModel`` that wraps ``model`` (see :func:`apply_lora`)."""
    return model.__dict__["_apo_peft"]


@contextlib.contextmanager
def reference_model(policy, reference):
    """The frozen reference to run: ``reference`` when one is loaded, else (LoRA) the policy
    with its adapters disabled for the duration of the block; None when there is neither."""
    if reference is not None or not is_lora(policy):
        yield reference
        return
    with peft_model(policy).disable_adapter():
        yield policy


def base_name(name: str) -> str:
    """A peft parameter name as the base model (and vLLM) names it."""
    for prefix in ("base_model.model.",):
        if name.startswith(prefix):
            name = name[len(prefix) :]
    return name.replace(".base_layer.", ".")


def _under(name: str, prefixes: set[str]) -> bool:
    parts = name.split(".")
    return any(".".join(parts[:i]) in prefixes for i in range(1, len(parts)))


@torch.no_grad()
def merged_weights(model, *, gather=None) -> list[tuple[str, torch.Tensor]]:
    """What the rollout engine needs after an update: for every module that holds an adapted
    layer (attention, MLP), all of its parameters under the base model's names, the adapted
    weights merged, W + delta (peft's ``get_delta_weight``), out of place. ``gather`` turns a
    sharded tensor into a full one (FSDP; a collective: every rank calls it)."""
    gather = gather or (lambda t: t)
    adapted = dict(_adapted(model))
    parents = {n.rsplit(".", 1)[0] for n in adapted}
    out = []
    for name, p in model.named_parameters():
        if "lora_" in name or not _under(name, parents):
            continue
        w = gather(p.detach())
        layer = name[: -len(".base_layer.weight")] if name.endswith(".base_layer.weight") else None
        if layer in adapted:
            delta = gather(adapted[layer].get_delta_weight(ADAPTER))
            w = (w.to(delta.dtype) + delta).to(w.dtype)
        out.append((base_name(name), w))
    return out


@torch.no_grad()
def merged_state_dict(model, state_dict: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The base model's state dict with the adapters merged (a ``from_pretrained`` folder's
    weights), under the base names. From the live model (peft's ``get_delta_weight``), or from
    ``state_dict``, the gathered parameters of a sharded one (delta = B A x scaling, peft's
    formula for a linear layer)."""
    adapted = dict(_adapted(model))
    sd = state_dict if state_dict is not None else {k: v.detach() for k, v in model.state_dict().items()}
    out = {}
    for k, v in sd.items():
        if "lora_" in k:
            continue
        layer = k[: -len(".base_layer.weight")] if k.endswith(".base_layer.weight") else None
        if layer in adapted:
            m = adapted[layer]
            if state_dict is None:
                delta = m.get_delta_weight(ADAPTER)
            else:
                a, b = sd[f"{layer}.lora_A.{ADAPTER}.weight"], sd[f"{layer}.lora_B.{ADAPTER}.weight"]
                delta = (b.float() @ a.float()) * m.scaling[ADAPTER]
            v = (v.to(delta.dtype) + delta).to(v.dtype)
        out[base_name(k)] = v
    return out


# ----------------------------------------------------------------------------- checkpoints
def save_checkpoint_policy(model, folder: Path, *, export_dtype=None, full_state_dict=None, merged: bool = False):
    """``folder/policy``: the adapter (``PeftModel.save_pretrained``); with ``merged``,
    ``folder/merged``: the merged model (``save_pretrained`` of the base model's class), in
    ``export_dtype``. ``full_state_dict``: the gathered parameters (FSDP), else the model's own."""
    pm = peft_model(model)
    policy = folder / "policy"
    sd = None
    if full_state_dict is not None:
        sd = {f"base_model.model.{k}": v for k, v in full_state_dict.items()}
    pm.save_pretrained(str(policy), state_dict=sd)
    if merged:
        msd = merged_state_dict(model, full_state_dict)
        if export_dtype is not None:
            msd = {k: v.to(export_dtype) if v.is_floating_point() else v for k, v in msd.items()}
        _save_base(model, folder / MERGED, msd)
    return policy


def _save_base(model, out: Path, state_dict: dict[str, torch.Tensor]) -> None:
    """A Hugging Face folder of the base architecture with ``state_dict`` (merged weights), written
    from a meta-device copy of the architecture so that no second model is held in memory."""
    base = _meta_model(model.config)
    keep = {n for n, _ in base.named_parameters()} | {n for n, _ in base.named_buffers()}
    base.save_pretrained(str(out), state_dict={k: v for k, v in state_dict.items() if k in keep})


def is_adapter_folder(path: str | Path) -> bool:
    return (Path(str(path)).expanduser() / ADAPTER_CONFIG).is_file()


def adapter_base(path: str | Path) -> str:
    """The base model an adapter folder was trained on (its ``base_model_name_or_path``)."""
    cfg = json.loads((Path(str(path)).expanduser() / ADAPTER_CONFIG).read_text())
    base = cfg.get("base_model_name_or_path")
    if not base:
        raise ConfigError(f"{path}/{ADAPTER_CONFIG} names no base_model_name_or_path: the adapter's base model")
    return str(base)


def load_adapted(path: str | Path, dtype: str = "float32", **kw: Any):
    """An adapter folder's base model with the adapter merged (for evaluation): the base from
    the adapter's ``base_model_name_or_path``, ``PeftModel.from_pretrained``, ``merge_and_unload``."""
    from framework.models.loading import load_model, resolve_path

    peft = import_peft()
    base = load_model(resolve_path(adapter_base(path)), dtype, trainable=False, **kw)
    return peft.PeftModel.from_pretrained(base, str(Path(str(path)).expanduser())).merge_and_unload()
