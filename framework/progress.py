"""Progress of a run, counted in RL steps (one rollout + its updates), never in Lightning's
optimizer steps or epochs.

In a terminal: Lightning's rich bar, ``RL step  12/80  reward 0.41  acc 0.38  kl 0.0021  1.9 s/step``.
Without one (SLURM, nohup, ``> log``): one plain, flushed line every ``trainer.log_every`` RL
steps and at the last, with the same numbers. Both read the module's last training row
(``RLModule.history``), so what they show is exactly what was logged.
"""

from __future__ import annotations

import logging
import math
import sys

from lightning.pytorch.callbacks import Callback
from lightning.pytorch.callbacks.progress.rich_progress import RichProgressBar

log = logging.getLogger(__name__)

# (label, metric key, format) of what the bar and the plain line show
SHOWN = (
    ("reward", "reward", "{:.3f}"),
    ("acc", "accuracy", "{:.3f}"),
    ("kl", "kl", "{:.4g}"),
)


def last_training_row(pl_module) -> dict[str, float]:
    """The newest row of the module's history that belongs to an RL step (evaluation rows are
    their own rows and carry no ``reward``)."""
    for row in reversed(getattr(pl_module, "history", [])):
        if "reward" in row:
            return row
    return {}


def step_numbers(row: dict[str, float]) -> dict[str, str]:
    """``{"reward": "0.412", "acc": "0.375", "kl": "0.0021", "s/step": "1.9"}``; a metric the
    step did not log (no KL term) is left out, a NaN is shown as ``nan``."""
    out = {}
    for label, key, fmt in SHOWN:
        if key in row:
            v = float(row[key])
            out[label] = "nan" if math.isnan(v) else fmt.format(v)
    if "timing_s/step" in row:
        out["s/step"] = f"{float(row['timing_s/step']):.2f}"
    return out


def use_rich_bar(enabled: bool) -> bool:
    """The bar only when asked for and stdout is a terminal it can redraw; else plain lines."""
    return enabled and sys.stdout.isatty()


class RLProgressBar(RichProgressBar):
    """Lightning's rich bar over ``trainer.max_steps`` RL steps; a resumed run starts at the RL
    step it resumed from. Its columns are the step's reward, accuracy, KL and step time (no
    ``v_num``, no Lightning step counter). ``max_steps``: the run's RL steps (``trainer.max_steps``)."""

    def __init__(self, max_steps: int, **kwargs):
        super().__init__(**kwargs)
        self.max_steps = int(max_steps)

    @property
    def total_train_batches(self) -> int:
        return self.max_steps

    def _get_train_description(self, current_epoch: int) -> str:
        return "RL step"

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self.is_disabled and self.train_progress_bar_id is None:
            self._initialize_train_progress_bar_id()
        self._update(self.train_progress_bar_id, int(pl_module.rl_step))
        self._update_metrics(trainer, pl_module)
        self.refresh()

    def get_metrics(self, trainer, pl_module) -> dict[str, str]:
        return step_numbers(last_training_row(pl_module))


class PlainProgress(Callback):
    """One line per ``every`` RL steps and at the last: ``step 12/80  reward 0.412  acc 0.375
    kl 0.0021  s/step 1.90``, through the ``framework`` logger (flushed per message, rank 0)."""

    def __init__(self, every: int, max_steps: int):
        self.every = max(1, int(every))
        self.max_steps = int(max_steps)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = int(pl_module.rl_step)
        if trainer.global_rank != 0 or not (step % self.every == 0 or step == self.max_steps):
            return
        shown = "  ".join(f"{k} {v}" for k, v in step_numbers(last_training_row(pl_module)).items())
        log.info("step %d/%d  %s", step, self.max_steps, shown)


def progress_callback(enabled: bool, log_every: int, max_steps: int) -> Callback:
    """The rich bar in a terminal, plain lines otherwise."""
    return RLProgressBar(max_steps) if use_rich_bar(enabled) else PlainProgress(log_every, max_steps)
