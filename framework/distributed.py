"""Multi-device training on Lightning strategies: ``trainer=ddp`` is Lightning's DDP;
``trainer=fsdp`` is Lightning's ``ModelParallelStrategy`` (PyTorch FSDP2, ``fully_shard``)
with the sharding applied here, in :func:`shard_model`, from ``trainer.fsdp``:

    every block in the model's ``_no_split_modules`` (decoder layers, vision blocks) is one
    FSDP unit, so is the vision tower's remainder (patch embedding, merger), and the rest
    (embeddings, final norm, LM head) is the root unit; FULL_SHARD
    (``reshard_after_forward``); bf16 compute with fp32 gradient reduction
    (``mixed_precision: bf16``, or ``model.dtype`` when null; master weights in ``model.master_dtype``); activation checkpointing
    of each block; optional CPU offload of parameters, gradients and optimizer state.

The frozen reference model is sharded the same way (it is never loaded when the algorithm
does not need it). Checkpoints are distributed (one shard per rank, ``torch.distributed.
checkpoint``), which resumes on any number of devices; every checkpoint also holds the
policy gathered into Hugging Face format (``policy/``).

Collectives: under FSDP every forward pass is a collective, so every rank makes the same
number of forward passes (:meth:`GradientSync.micro_batches` pads, ``synced_gpus`` in
generation, padding batches in ``Evaluator.run``).

Gradients (:class:`GradientSync`, chosen once at setup by :func:`make_gradient_sync`): DDP's
per-backward all-reduce is switched off inside an RL step and the gradients are summed once
before the optimizer step; FSDP reduce-scatters (averages) on every backward, so each loss is
scaled by the world size. Both give the gradient of the global-batch loss (the loss uses
global token/sequence counts, :meth:`GradientSync.normalizer`).
"""

from __future__ import annotations

import contextlib
import types
from typing import Any

import torch
from lightning.pytorch.strategies import ModelParallelStrategy


def is_sharded(model: torch.nn.Module) -> bool:
    """True when ``model`` holds FSDP2-sharded parameters (DTensors)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class FSDPStrategy(ModelParallelStrategy):
    """Lightning's FSDP2 strategy with a pure data-parallel mesh (no tensor parallelism). With
    CPU offload the sharded parameters stay on the CPU: the strategy must not move them."""

    def __init__(self, fsdp_cfg, world_size: int, **kw):
        super().__init__(
            data_parallel_size=world_size,
            tensor_parallel_size=1,
            save_distributed_checkpoint=fsdp_cfg.sharded_checkpoint,
            **kw,
        )
        self.fsdp_cfg = fsdp_cfg

    def model_to_device(self) -> None:
        if not self.fsdp_cfg.cpu_offload:
            super().model_to_device()


def make_strategy(t) -> Any:
    """The Lightning strategy for ``trainer.strategy``: ``fsdp`` becomes :class:`FSDPStrategy`
    (FSDP2); any other value (``auto``, ``ddp``, ``ddp_spawn``, ...) is passed to Lightning."""
    if t.strategy != "fsdp":
        return t.strategy
    devices = t.devices if isinstance(t.devices, int) else len(t.devices)
    return FSDPStrategy(t.fsdp, world_size=int(devices) * int(t.num_nodes))


def uses_fsdp(trainer) -> bool:
    return trainer is not None and isinstance(trainer.strategy, FSDPStrategy)


def block_modules(model: torch.nn.Module, names=None) -> list[torch.nn.Module]:
    """The modules FSDP shards one by one: instances of the classes ``names`` (default: the
    model's ``_no_split_modules``: decoder layers, vision blocks)."""
    names = set(names or getattr(model, "_no_split_modules", None) or [])
    return [m for m in model.modules() if type(m).__name__ in names]


def shard_model(
    model: torch.nn.Module, fsdp_cfg, mesh=None, *, trainable: bool, compute_dtype: torch.dtype | None = None
) -> torch.nn.Module:
    """Apply FSDP2 to a Hugging Face model in place: one unit per ``_no_split_modules`` block,
    the model itself as the root unit. Adds ``model.apo_completion_logprobs``, the chunked
    log-prob computation registered as an FSDP forward method (it calls the backbone and the
    LM head directly, so the root unit must gather its parameters around it)."""
    from torch.distributed.fsdp import (
        CPUOffloadPolicy,
        MixedPrecisionPolicy,
        OffloadPolicy,
        fully_shard,
        register_fsdp_forward_method,
    )

    from framework.logprobs import completion_logprobs_unsharded

    # compute dtype: trainer.fsdp.mixed_precision, else model.dtype where it differs from the
    # (master) dtype the parameters were loaded in; reduction in fp32 whenever compute is narrower
    mp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(fsdp_cfg.mixed_precision, compute_dtype)
    if mp is not None and mp == next(model.parameters()).dtype:
        mp = None
    kw: dict[str, Any] = dict(
        mesh=mesh,
        reshard_after_forward=fsdp_cfg.reshard_after_forward,
        mp_policy=MixedPrecisionPolicy(param_dtype=mp, reduce_dtype=torch.float32 if mp else None),
        offload_policy=CPUOffloadPolicy(pin_memory=torch.cuda.is_available())
        if fsdp_cfg.cpu_offload
        else OffloadPolicy(),
    )
    names = fsdp_cfg.wrap or getattr(model, "_no_split_modules", None)
    if not names:
        raise ValueError(
            f"{type(model).__name__} names no blocks to shard (_no_split_modules is empty): "
            "set trainer.fsdp.wrap=[<block class name>, ...]"
        )
    blocks = block_modules(model, names)
    if not blocks:
        found = sorted({type(m).__name__ for m in model.modules()})
        raise ValueError(
            f"trainer.fsdp.wrap={sorted(names)}: no such module in {type(model).__name__}; "
            f"module classes there: {found}"
        )
    if trainable and fsdp_cfg.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    for b in blocks:
        fully_shard(b, **kw)
    # the vision tower is called on its own (generate encodes images before the first forward)
    visual = getattr(getattr(model, "model", model), "visual", None)
    if visual is not None:
        fully_shard(visual, **kw)
    fully_shard(model, **kw)
    # FSDP2 picks its root at the first forward; generation calls the vision tower before the
    # model's forward, so make the model the root now (no public API for this in torch 2.13)
    model._get_fsdp_state()._lazy_init()
    model.apo_completion_logprobs = types.MethodType(completion_logprobs_unsharded, model)
    register_fsdp_forward_method(model, "apo_completion_logprobs")
    return model


def full_state_dict_for_export(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """All parameters and buffers gathered on the CPU (a collective: every rank calls it),
    without the second name of tied weights (``lm_head.weight`` when it is the embedding), as
    ``save_pretrained`` writes them."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(
        model, options=StateDictOptions(full_state_dict=True, cpu_offload=True, broadcast_from_rank0=False)
    )
    keep = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
    return {k: v for k, v in sd.items() if k in keep}


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A DTensor gathered into a plain tensor (a collective); a plain tensor unchanged."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def clip_grad_norm(params: list[torch.nn.Parameter], max_norm: float | None, finite_only: bool = False) -> float:
    """Clip to ``max_norm`` by the global L2 norm of the gradients, sharded (DTensor) or not;
    returns the norm before clipping (``finite_only``: a non-finite norm clips nothing)."""
    if not params:
        return 0.0
    norm = full_tensor(torch.nn.utils.get_total_norm([p.grad for p in params], norm_type=2.0))
    if max_norm and (not finite_only or bool(torch.isfinite(norm))):
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return float(norm)


def all_reduce(values: list[float], op: str = "sum") -> list[float]:
    """Reduce a few numbers over ranks (float64); identity on one process."""
    import torch.distributed as dist

    rank, ws = world()
    if ws <= 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}[op])
    return t.tolist()


# ----------------------------------------------------------------------------- gradient sync
class GradientSync:
    """How the gradients of one RL step's many backward passes become the gradient of the
    global-batch loss. One process: nothing to do. Chosen once at setup
    (:func:`make_gradient_sync`); the update loop (framework/update.py) calls, per mini-batch:
    ``normalizer`` (global denominators) -> ``micro_batches`` -> per micro-batch
    ``any_rank`` (agree on skipping) and ``no_sync()`` around ``backward(loss * grad_scale)``
    -> ``reduce(params)`` before clipping and the optimizer step."""

    world_size = 1
    grad_scale = 1.0  # factor on each backward's loss
    collective = False  # every forward (and generation) is a collective over ranks (FSDP)

    def normalizer(self, norm):
        """Denominators summed over all ranks, so that the rank losses add up to the loss of the
        global batch (token_mean divides by the token count of all ranks and micro-batches)."""
        from framework.types import LossNormalizer

        n_seq, n_tok = all_reduce([norm.num_sequences, norm.num_tokens], "sum")
        return LossNormalizer(num_sequences=n_seq, num_tokens=n_tok, max_len=norm.max_len)

    def micro_batches(self, n: int, size: int) -> list[tuple[list[int], bool]]:
        """``(rows, real)`` micro-batches of ``size`` rows out of ``n``; ``real=False`` marks a
        padding pass (only under FSDP)."""
        return [(list(range(i, min(n, i + size))), True) for i in range(0, n, size)]

    def any_rank(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is true on any rank (all ranks skip together)."""
        return bool(all_reduce([float(flag)], "max")[0])

    def no_sync(self):
        return contextlib.nullcontext()

    def reduce(self, params: list[torch.nn.Parameter]) -> None:
        """Make each parameter's gradient the global one (before clipping)."""


class DDPGradientSync(GradientSync):
    """Lightning's DDP: local gradients accumulate without DDP's per-backward all-reduce (an RL
    step makes many backward passes inside one training_step) and are summed once."""

    def __init__(self, strategy, world_size: int):
        self.strategy, self.world_size = strategy, world_size

    def no_sync(self):
        wrapped = self.strategy.model  # the DistributedDataParallel wrapper Lightning made
        return wrapped.no_sync() if hasattr(wrapped, "no_sync") else contextlib.nullcontext()

    def reduce(self, params: list[torch.nn.Parameter]) -> None:
        """Sum over ranks. Each rank's loss already uses the global denominators, so the sum is
        the gradient of the global-batch loss. One flat all-reduce, not one per parameter."""
        import torch.distributed as dist

        params = [p for p in params if p.requires_grad]
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        flat = torch.cat([p.grad.reshape(-1) for p in params])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        off = 0
        for p in params:
            p.grad.copy_(flat[off : off + p.numel()].view_as(p))
            off += p.numel()


class FSDPGradientSync(GradientSync):
    """FSDP2 with more than one rank: gradients are reduce-scattered (averaged) on every
    backward, so each loss is scaled by the world size (the average is then the sum of the
    rank losses' gradients); every forward is a collective, so ranks with fewer micro-batches
    (uneven ``filter_groups`` refills) add padding passes."""

    collective = True

    def __init__(self, world_size: int):
        self.world_size = world_size
        self.grad_scale = float(world_size)

    def micro_batches(self, n: int, size: int) -> list[tuple[list[int], bool]]:
        batches = super().micro_batches(n, size)
        most = int(all_reduce([float(len(batches))], "max")[0])
        return batches + [(batches[0][0], False)] * (most - len(batches))


def make_gradient_sync(trainer) -> GradientSync:
    """The gradient strategy of ``trainer``'s Lightning strategy (one process: the base)."""
    from lightning.pytorch.strategies import DDPStrategy

    ws = trainer.world_size if trainer is not None else 1
    if ws <= 1:
        return GradientSync()
    if uses_fsdp(trainer):
        return FSDPGradientSync(ws)
    if isinstance(trainer.strategy, DDPStrategy):
        return DDPGradientSync(trainer.strategy, ws)
    raise NotImplementedError(
        f"strategy {type(trainer.strategy).__name__} with {ws} processes: use trainer=ddp or trainer=fsdp"
    )
