"""Checkpoints: ``checkpoints/step-NNNNNN/`` holds ``policy/`` (Hugging Face format, loadable
with ``from_pretrained``, with its tokenizer/processor) and ``state.ckpt`` (Lightning's
checkpoint: optimizer, LR scheduler, loop progress, RL step, RNG state). ``resume=<folder>``
continues the same run from it."""
from __future__ import annotations

from pathlib import Path

import lightning as L

from framework.config import ConfigError


class RLCheckpoint(L.Callback):
    def __init__(self, root: Path, every: int, bundle):
        self.root, self.every, self.bundle = Path(root), every, bundle
        self.last: Path | None = None

    def save(self, trainer, module) -> Path:
        d = self.root / f"step-{module.rl_step:06d}"
        trainer.save_checkpoint(str(d / "state.ckpt"))
        if trainer.is_global_zero:
            module.policy.save_pretrained(str(d / "policy"))
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


def resolve_resume(resume) -> str | None:
    if not resume:
        return None
    p = Path(str(resume)).expanduser()
    if p.is_dir():
        p = p / "state.ckpt"
    if not p.exists():
        raise ConfigError(f"resume={resume}: no checkpoint there (expected a checkpoints/step-NNNNNN folder or its state.ckpt)")
    return str(p)
