"""The start-up memory budget: what one device will hold for the chosen model, strategy and
batch, logged before any weight is loaded (:meth:`MemoryBudget.log`), so that an out-of-memory is predicted instead of
met. Parameter counts are exact (the model is built on the ``meta`` device from its config);
activations and KV cache are estimates from the architecture:

    N, N_train     parameters of the model / the trainable ones (vision tower frozen or not)
    b_p, b_c       bytes per trained parameter (model.master_dtype: fp32 master weights by
                   default) / per activation and frozen-reference parameter (the compute dtype:
                   trainer.fsdp.mixed_precision under FSDP, else model.dtype)
    S              shards: the world size under FSDP, else 1 (DDP replicates everything)

    weights        N * b_p / S                  (0 on the device with CPU offload)
    gradients      N_train * b_p / S            (kept in the parameter dtype)
    optimizer      2 * N_train * b_p / S        (AdamW: exp_avg, exp_avg_sq)
    reference      N * b_c / S                  (0 when the algorithm never needs it)

    With LoRA (model.lora, n adapter parameters): weights N * b_c + n * b_p (the frozen base in
    the compute dtype), gradients n * b_p, optimizer 2 n b_p, reference 0 (the policy with its
    adapters disabled).
    FSDP gathered  (root unit + 2 largest blocks) * b_c    (the blocks being computed/prefetched)
    activations    one micro-batch of t = micro_batch_size * (max_prompt_tokens + max_new_tokens)
                   tokens: per block a_l = t * (8h + 3 kv + 4 I) * b_c (saved inputs of norms,
                   q/k/v, rotary, attention output, gate/up/act/product of the MLP; flash/sdpa
                   attention keeps no s^2 scores); with activation checkpointing
                   L * t * h * b_c + a_l, else L * a_l; plus the LM head in log-prob chunks
                   of c tokens: 3 * c * V * 4 (fp32 logits, softmax, their gradient)
    rollout KV     n * (max_prompt_tokens + max_new_tokens) * 2 * L * kv * b_c for the
                   n = prompts per rank * G sequences generated together (transformers
                   engine); vLLM reserves rollout.gpu_memory_utilization of the device for its
                   weights and KV cache, released during the update with rollout.sleep=true

    update phase   weights + gradients + optimizer + reference + gathered + activations
    rollout phase  weights + optimizer + reference + gathered + KV   (+ vLLM pool if awake)

h hidden size, I MLP size, L layers, kv = key/value heads * head dim, V vocabulary. The
vision tower's activations (a few hundred tokens an image) are not counted.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from framework.models.loading import DTYPES

log = logging.getLogger(__name__)

GiB = 1024**3
BYTES = {name: dtype.itemsize for name, dtype in DTYPES.items()}  # model.dtype names -> bytes


@dataclass
class ParamCounts:
    total: int
    vision: int
    root: int  # parameters outside every block (embeddings, norm, LM head, merger)
    largest_block: int


@dataclass
class Architecture:
    hidden: int
    intermediate: int
    layers: int
    kv_dim: int  # key/value heads * head dim
    vocab: int


def _text_config(cfg):
    return getattr(cfg, "text_config", None) or cfg


def architecture(cfg) -> Architecture:
    t = _text_config(cfg)
    heads = t.num_attention_heads
    head_dim = getattr(t, "head_dim", None) or t.hidden_size // heads
    kv = getattr(t, "num_key_value_heads", None) or heads
    return Architecture(
        hidden=t.hidden_size,
        intermediate=t.intermediate_size,
        layers=t.num_hidden_layers,
        kv_dim=kv * head_dim,
        vocab=t.vocab_size,
    )


def count_params(cfg) -> ParamCounts:
    """Exact parameter counts of the model ``cfg`` describes, built on the meta device (no
    memory, no weights needed). Tied embeddings are counted once."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    from framework.distributed import block_modules

    cls = AutoModelForImageTextToText if hasattr(cfg, "vision_config") else AutoModelForCausalLM
    with torch.device("meta"):
        model = cls.from_config(cfg)
    total = sum(p.numel() for p in model.parameters())
    core = getattr(model, "model", model)
    visual = getattr(core, "visual", None)
    vision = sum(p.numel() for p in visual.parameters()) if visual is not None else 0
    blocks = block_modules(model)  # the units FSDP shards
    in_blocks = {id(p) for b in blocks for p in b.parameters()}
    root = sum(p.numel() for p in model.parameters() if id(p) not in in_blocks)
    largest = max((sum(p.numel() for p in b.parameters()) for b in blocks), default=0)
    return ParamCounts(total=total, vision=vision, root=root, largest_block=largest)


def _size(b: float) -> str:
    return f"{b / GiB:9.2f} GiB" if b >= GiB / 10 or b == 0 else f"{b / 1024**2:9.2f} MiB"


def _count(n: float) -> str:
    return f"{n / 1e9:.3f}B" if n >= 1e8 else f"{n / 1e6:.2f}M"


@dataclass
class MemoryBudget:
    rows: list[tuple[str, float, str]] = field(default_factory=list)  # (item, bytes per device, note)
    update_bytes: float = 0.0
    rollout_bytes: float = 0.0
    device_bytes: float | None = None
    device_name: str = ""

    @property
    def peak_bytes(self) -> float:
        return max(self.update_bytes, self.rollout_bytes)

    def row(self, name: str) -> float:
        return next(b for n, b, _ in self.rows if n == name)

    def format(self) -> str:
        lines = ["apo-rl memory budget (per device, estimate):"]
        for name, b, note in self.rows:
            lines.append(f"  {name:<15}{_size(b)}  {note}")
        lines.append(f"  {'update phase':<15}{_size(self.update_bytes)}")
        lines.append(f"  {'rollout phase':<15}{_size(self.rollout_bytes)}")
        if self.device_bytes:
            verdict = "fits" if self.peak_bytes <= 0.95 * self.device_bytes else "DOES NOT FIT"
            lines.append(
                f"  device: {self.device_name} {self.device_bytes / GiB:.1f} GiB -> peak "
                f"{self.peak_bytes / GiB:.2f} GiB {verdict}"
            )
        return "\n".join(lines)

    def warning(self) -> str | None:
        if not self.device_bytes or self.peak_bytes <= 0.95 * self.device_bytes:
            return None
        return (
            f"WARNING: the predicted peak ({self.peak_bytes / GiB:.1f} GiB) exceeds the device memory "
            f"({self.device_bytes / GiB:.1f} GiB). Options: trainer=fsdp (shards weights, gradients, optimizer "
            "and reference), trainer.fsdp.cpu_offload=true, a smaller trainer.micro_batch_size, "
            "model.gradient_checkpointing=true, rollout.sleep=true (vLLM), a smaller rollout.max_new_tokens."
        )

    def log(self, logger: logging.Logger | None = None) -> None:
        """:meth:`format` at INFO and, when the peak exceeds the device, :meth:`warning` at WARNING."""
        logger = logger or log
        logger.info(self.format())
        warning = self.warning()
        if warning:
            logger.warning(warning)


def estimate(
    cfg,
    counts: ParamCounts,
    *,
    model_dtype: str,
    world_size: int,
    compute_dtype: str | None = None,
    fsdp=None,
    needs_reference: bool,
    freeze_vision_tower: bool,
    gradient_checkpointing: bool,
    micro_batch_size: int,
    prompt_tokens: int,
    new_tokens: int,
    logprob_chunk: int,
    gen_sequences: int,
    engine: str = "hf",
    vllm_utilization: float = 0.5,
    vllm_sleep: bool = False,
    device_bytes: float | None = None,
    device_name: str = "",
    lora_params: int | None = None,
) -> MemoryBudget:
    """The budget for one device; see the module docstring for every formula. ``lora_params``:
    the number of LoRA adapter parameters when only they are trained (model.lora)."""
    a = architecture(cfg)
    b_p = BYTES[model_dtype]
    sharded = fsdp is not None
    mp = getattr(fsdp, "mixed_precision", None) if sharded else None
    b_c = BYTES[mp] if mp else BYTES[compute_dtype] if compute_dtype else b_p
    S = world_size if sharded else 1
    offload = sharded and bool(fsdp.cpu_offload)
    ckpt = (sharded and bool(fsdp.activation_checkpointing)) or gradient_checkpointing
    n_train = counts.total - (counts.vision if freeze_vision_tower else 0)
    lora = lora_params is not None
    b_r = BYTES[compute_dtype] if compute_dtype else b_p  # the reference is loaded in the compute dtype
    if lora:  # the frozen base in the compute dtype, the adapters are the master weights
        n_train = lora_params
    on_dev = 0.0 if offload else 1.0
    where = " (on the CPU: offloaded)" if offload else ""
    shard_note = f" / {S} shards" if sharded else ""

    out = MemoryBudget(device_bytes=device_bytes, device_name=device_name)
    weights = on_dev * (counts.total * b_r + n_train * b_p if lora else counts.total * b_p) / S
    grads = on_dev * n_train * b_p / S
    optim = on_dev * 2 * n_train * b_p / S
    ref = on_dev * counts.total * b_r / S if needs_reference and not lora else 0.0
    gathered = (counts.root + 2 * counts.largest_block) * b_c if sharded else 0.0
    t = micro_batch_size * (prompt_tokens + new_tokens)
    per_block = t * (8 * a.hidden + 3 * a.kv_dim + 4 * a.intermediate) * b_c
    blocks = a.layers * t * a.hidden * b_c + per_block if ckpt else a.layers * per_block
    head = 3 * min(logprob_chunk, micro_batch_size * new_tokens) * a.vocab * 4
    acts = blocks + head
    seq = prompt_tokens + new_tokens
    kv = gen_sequences * seq * 2 * a.layers * a.kv_dim * b_c
    vllm_pool = 0.0
    if engine == "vllm":
        vllm_pool = vllm_utilization * device_bytes if device_bytes else counts.total * b_c + kv
        kv = 0.0

    out.rows += [
        (
            "weights",
            weights,
            f"{_count(counts.total)} frozen x {b_r} B + {_count(n_train)} LoRA x {b_p} B{shard_note}{where}"
            if lora
            else f"{_count(counts.total)} params x {b_p} B{shard_note}{where}",
        ),
        ("gradients", grads, f"{_count(n_train)} {'LoRA' if lora else 'trainable'} x {b_p} B{shard_note}{where}"),
        ("optimizer", optim, f"AdamW 2 x {_count(n_train)} x {b_p} B{shard_note}{where}"),
        (
            "reference",
            ref,
            (
                "none: the policy with its LoRA adapters disabled (no copy)"
                if needs_reference and lora
                else f"frozen copy x {b_r} B{shard_note}{where}"
                if needs_reference
                else "not loaded (the algorithm never uses it)"
            ),
        ),
    ]
    if sharded:
        out.rows.append(("FSDP gathered", gathered, f"root unit + 2 blocks in {'bf16' if b_c == 2 else 'fp32'}"))
    out.rows += [
        (
            "activations",
            acts,
            f"micro-batch {micro_batch_size} x {prompt_tokens}+{new_tokens} tokens, "
            f"{'checkpointed' if ckpt else 'no checkpointing'}, log-prob chunks of {logprob_chunk}",
        ),
    ]
    if engine == "vllm":
        out.rows.append(
            (
                "rollout vLLM",
                vllm_pool,
                f"gpu_memory_utilization={vllm_utilization} (weights + KV cache)"
                + (", freed during the update (sleep)" if vllm_sleep else ""),
            )
        )
    else:
        out.rows.append(("rollout KV", kv, f"{gen_sequences} sequences x {seq} tokens"))
    resident_vllm = 0.0 if vllm_sleep else vllm_pool
    out.update_bytes = weights + grads + optim + ref + gathered + acts + resident_vllm
    out.rollout_bytes = weights + optim + ref + gathered + kv + vllm_pool
    return out


def budget_for_run(path: str, sections: dict, algorithm, world_size: int, prompt_tokens: int) -> MemoryBudget:
    """:func:`estimate` from a run's config sections (model folder ``path`` holds config.json)."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(path)
    m, t, r = sections["model"], sections["trainer"], sections["rollout"]
    lora_params = None
    if m.lora.enabled:
        from framework.models.lora import check_lora

        lora_params = check_lora(path, m.lora)
    device_bytes, name = None, ""
    if t.accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        device_bytes, name = float(props.total_memory), props.name
    return estimate(
        cfg,
        count_params(cfg),
        model_dtype=m.master_dtype,
        compute_dtype=m.dtype,
        world_size=world_size,
        fsdp=t.fsdp if t.strategy == "fsdp" else None,
        needs_reference=algorithm.needs_reference,
        freeze_vision_tower=m.freeze_vision_tower,
        gradient_checkpointing=m.gradient_checkpointing,
        micro_batch_size=t.micro_batch_size,
        prompt_tokens=prompt_tokens,
        new_tokens=r.max_new_tokens,
        logprob_chunk=t.logprob_chunk_size,
        gen_sequences=max(1, t.prompts_per_step // world_size) * r.group_size,
        engine=r.engine,
        vllm_utilization=r.gpu_memory_utilization,
        vllm_sleep=r.sleep,
        device_bytes=device_bytes,
        device_name=name,
        lora_params=lora_params,
    )
