"""Checkpoints: ``checkpoints/step-NNNNNN/`` holds ``policy/`` (Hugging Face format, loadable
with ``from_pretrained``, with its tokenizer/processor) and ``state.ckpt`` (Lightning's
checkpoint: optimizer, LR scheduler, loop progress, RL step, RNG state). ``resume=<folder>``
continues the same run from it.

Under ``trainer.strategy=fsdp`` with ``trainer.fsdp.sharded_checkpoint=true``, ``state.ckpt``
is a folder of ``torch.distributed.checkpoint`` shards (one per rank, plus ``meta.pt``); it
resumes under FSDP on any number of devices (the shards are re-split on load), and
``policy/`` is the gathered Hugging Face export."""

from __future__ import annotations

from pathlib import Path

import lightning as L

from framework.config import ConfigError


class RLCheckpoint(L.Callback):
    def __init__(self, root: Path, every: int, bundle, export_dtype=None):
        """``export_dtype``: the torch dtype of the ``policy/`` export (None: the weights' own);
        ``state.ckpt`` always holds the (master) weights as they are trained."""
        self.root, self.every, self.bundle, self.export_dtype = Path(root), every, bundle, export_dtype
        self.last: Path | None = None

    def save(self, trainer, module) -> Path:
        from framework.distributed import full_state_dict_for_export, is_sharded

        d = self.root / f"step-{module.rl_step:06d}"
        trainer.save_checkpoint(str(d / "state.ckpt"))  # FSDP: a folder with one shard per rank
        # FSDP: the policy's shards gathered on every rank (a collective), written by rank 0
        full = full_state_dict_for_export(module.policy) if is_sharded(module.policy) else None
        if trainer.is_global_zero:
            if self.export_dtype is not None:  # e.g. fp32 master weights exported in bf16
                sd = full if full is not None else module.policy.state_dict()
                full = {k: v.to(self.export_dtype) if v.is_floating_point() else v for k, v in sd.items()}
            module.policy.save_pretrained(str(d / "policy"), state_dict=full)
            self.bundle.tokenizer.save_pretrained(str(d / "policy"))
            ip = getattr(self.bundle.processor, "image_processor", None)
            if ip is not None:
                ip.save_pretrained(str(d / "policy"))
        self.last = d
        return d

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if self.every and module.rl_step % self.every == 0:
            self.save(trainer, module)

    def on_train_end(self, trainer, module):
        if self.last is None or self.last.name != f"step-{module.rl_step:06d}":
            self.save(trainer, module)


def resolve_resume(resume, strategy: str = "auto") -> str | None:
    if not resume:
        return None
    p = Path(str(resume)).expanduser()
    if p.is_dir() and (p / "state.ckpt").exists():
        p = p / "state.ckpt"
    if not p.exists() or (p.is_dir() and not (p / "meta.pt").exists()):
        raise ConfigError(
            f"resume={resume}: no checkpoint there (expected a checkpoints/step-NNNNNN folder or its state.ckpt)"
        )
    if p.is_dir() and strategy != "fsdp":
        raise ConfigError(
            f"resume={resume} is a sharded FSDP checkpoint: resume it with trainer=fsdp (any number of "
            f"devices, trainer.devices=N), or start a new run from its Hugging Face export with "
            f"model.name_or_path={p.parent / 'policy'}"
        )
    return str(p)
