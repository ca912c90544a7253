"""The run's loggers: CSV (``<run>/csv/metrics.csv``) and W&B (offline by default).

A resumed run writes into the same folder: the CSV file keeps its rows up to the resumed
step (Lightning's own CSV logger deletes the file), and W&B continues the same run id.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

from lightning.pytorch.loggers import CSVLogger, WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

from framework.errors import UserError

WANDB_SERVICE = "WANDB_SERVICE"  # W&B's variable naming the service a process (and its children) use


class _AppendingWriter(ExperimentWriter):
    """Lightning's CSV writer that continues an existing ``metrics.csv`` instead of deleting it:
    rows of RL steps after ``keep_until`` (redone by the resumed run) are dropped, the header is
    kept so that new columns are merged in."""

    def __init__(self, log_dir: str, keep_until: int | None = None):
        self.keep_until = keep_until  # before super().__init__: it calls _check_log_dir_exists
        super().__init__(log_dir=log_dir)

    def _check_log_dir_exists(self) -> None:
        p = Path(self.metrics_file_path)
        if not p.is_file():
            return
        if self.keep_until is None:  # a new run in a used folder: start afresh, as Lightning does
            p.unlink()
            return
        with p.open(newline="") as f:
            reader = csv.DictReader(f)
            keys = list(reader.fieldnames or [])
            rows = [r for r in reader if self._keep(r)]
        with p.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(rows)
        self.metrics_keys = keys

    def _keep(self, row: dict) -> bool:
        """Rows of the steps before the checkpoint's, and its own training row; its evaluation
        (if one was due) runs after the checkpoint was written, so the resumed run redoes it."""
        try:
            step = float(row.get("rl_step") or 0)
        except ValueError:
            return False
        return step < self.keep_until or (step == self.keep_until and not row.get("eval/step"))


class RunCSVLogger(CSVLogger):
    def __init__(self, save_dir: str, keep_until: int | None = None):
        # every row written at once: the file shows progress and survives a kill
        super().__init__(save_dir=save_dir, name="", version="csv", flush_logs_every_n_steps=1)
        self._keep_until = keep_until

    @property
    def experiment(self):
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(self.log_dir, keep_until=self._keep_until)
        return self._experiment


class RunWandbLogger(WandbLogger):
    """Lightning's W&B logger with one step axis: every chart is drawn against the RL step
    (``define_metric``, declared with the first row: the W&B run starts when Lightning first
    needs it, not when the logger is built). An id W&B refuses as "in use" is a
    :class:`UserError` that says why and what to do (:func:`wandb_id_in_use`)."""

    _step_axis_defined = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        # Lightning always passes `anonymous` (None when unset) and W&B 0.31 warns that the
        # setting has no effect whenever it is passed: leave it out
        if self._wandb_init.get("anonymous") is None:
            self._wandb_init.pop("anonymous", None)

    @property
    def experiment(self):
        try:
            return super().experiment
        except Exception as e:
            if "is in use" not in str(e):
                raise
            raise UserError(wandb_id_in_use(self._id)) from e

    def log_metrics(self, metrics, step=None) -> None:
        if not self._step_axis_defined:
            self.experiment.define_metric("rl_step")
            self.experiment.define_metric("*", step_metric="rl_step")
            self._step_axis_defined = True
        super().log_metrics(metrics, step)


def make_loggers(logger_cfg, run_config: dict, out: Path, *, wandb_id: str | None, resumed_step: int | None):
    """CSV and W&B loggers for the run in ``out``; ``wandb_id`` names the W&B run (a resumed
    run passes its stored id and continues it)."""
    lg = logger_cfg
    loggers = []
    if lg.csv:
        loggers.append(RunCSVLogger(save_dir=str(out), keep_until=resumed_step))
    mode = wandb_mode(lg)
    if lg.wandb and mode != "disabled":
        os.environ["WANDB_MODE"] = mode
        os.environ.setdefault("WANDB_SILENT", "true")
        wb = RunWandbLogger(
            project=lg.project,
            group=lg.group,
            name=lg.name or run_name(run_config),
            tags=list(lg.tags),
            save_dir=str(out),
            config=run_config,
            id=wandb_id,
            resume="allow",
        )
        loggers.append(wb)
    return loggers


def finish_wandb(loggers) -> None:
    """Finish the W&B runs this process started (rank 0): the offline run file is complete
    and closed when training returns, also when ``train()`` is called from Python."""
    for lg in loggers:
        if isinstance(lg, WandbLogger) and getattr(lg, "_experiment", None) is not None:
            lg.experiment.finish()


def wandb_id_in_use(run_id: str | None) -> str:
    """What to do when W&B refuses a run id as "in use" (a resumed run, usually)."""
    if os.environ.get(WANDB_SERVICE):
        return (
            f"W&B run {run_id} is still open in the W&B service this process joined ({WANDB_SERVICE} is set, "
            "e.g. by a parent process that used W&B): a killed run's id stays in use there until that service "
            f"ends. Unset {WANDB_SERVICE} for this run (or end the parent process), then run the same command again"
        )
    return (
        f"W&B run {run_id} is in use by another process: is a run of this folder still running? "
        "Stop it, then run the same command again"
    )


def without_wandb_service(env: dict[str, str]) -> dict[str, str]:
    """``env`` for a run started as a child process, without the parent's W&B service
    (``WANDB_SERVICE``, which W&B puts in the environment of a process that used it): the child
    starts its own, so a child that is killed cannot leave its run id "in use" for the one that
    resumes it (W&B's own sweep agent does the same for its runs)."""
    return {k: v for k, v in env.items() if k != WANDB_SERVICE}


def new_wandb_id() -> str:
    """A fresh W&B run id (chosen here, so that it is stored with every checkpoint)."""
    from wandb.sdk.lib.runid import generate_id

    return generate_id()


def wandb_mode(logger_cfg) -> str:
    """``WANDB_MODE`` from the environment wins over ``logger.wandb_mode`` (W&B's own rule), so
    ``WANDB_MODE=disabled`` turns W&B off whatever the config says."""
    return os.environ.get("WANDB_MODE") or logger_cfg.wandb_mode


def run_name(run_config: dict) -> str:
    """``<algorithm>-<model>-seed<k>``, the W&B run name when ``logger.name`` is not set."""
    model = str(run_config["model"]["name_or_path"]).rstrip("/").split("/")[-1]
    return f"{run_config['algorithm']['name']}-{model.replace(':', '_')}-seed{run_config['seed']}"
