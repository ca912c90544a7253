"""Checkpoints: ``checkpoints/step-NNNNNN/`` holds

    policy/          Hugging Face format (``from_pretrained``), with its tokenizer/processor,
                     in ``model.export_dtype`` (default: model.dtype); with LoRA the adapter
                     (``PeftModel.from_pretrained``), and with model.lora.export_merged also
                     merged/: the adapted model merged, in Hugging Face format
    state.ckpt       Lightning's checkpoint: the (master) weights as trained, optimizer, LR
                     scheduler, loop progress, RL step, RNG state
    run_config.yaml  the run's composed config: ``resume=`` alone continues *this* run
    run.json         the RL step, the W&B run id and the output folder
    COMPLETE.json    written last: every file of the checkpoint with its size

A checkpoint is written into ``step-NNNNNN.partial/`` and renamed when complete, so a run
killed mid-write never leaves a folder that resume takes for a checkpoint; resume checks the
sizes in ``COMPLETE.json`` before anything loads.

``resume=<checkpoint folder>`` (or its ``state.ckpt``, or ``resume=<run folder>``: its newest
complete checkpoint) continues the run: :func:`resume_config` restores the stored config;
overrides may only change keys that do not change what is trained (:data:`RESUMABLE`).

Under ``trainer.strategy=fsdp`` with ``trainer.fsdp.sharded_checkpoint=true``, ``state.ckpt``
is a folder of ``torch.distributed.checkpoint`` shards (one per rank, plus ``meta.pt``); it
resumes under FSDP on any number of devices (the shards are re-split on load), and
``policy/`` is the gathered Hugging Face export."""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
from omegaconf import DictConfig, OmegaConf

from framework.errors import ConfigError

log = logging.getLogger(__name__)

MARKER, RUN_CONFIG, RUN_INFO, PARTIAL = "COMPLETE.json", "run_config.yaml", "run.json", ".partial"

# keys an override given with ``resume=`` may change: they do not change what is trained
# (budget, evaluation and logging cadence, memory knobs, the hardware); everything else fails
RESUMABLE = (
    "resume",
    "output_dir",
    "plugins",
    "trainer.max_steps",
    "trainer.eval_*",
    "trainer.save_every",
    "trainer.log_every",
    "trainer.log_completions_every",
    "trainer.progress_bar",
    "trainer.num_workers",
    "trainer.micro_batch_size",
    "trainer.logprob_chunk_size",
    "trainer.accelerator",
    "trainer.devices",
    "trainer.num_nodes",
    "trainer.fsdp.cpu_offload",
    "trainer.fsdp.activation_checkpointing",
    "trainer.fsdp.reshard_after_forward",
    "rollout.gpu_memory_utilization",
    "rollout.enforce_eager",
    "rollout.sleep",
    "logger.*",
)


@dataclass
class RunInfo:
    """What a checkpoint says about its run (``run.json``)."""

    rl_step: int
    output_dir: str
    wandb_id: str | None = None


class RLCheckpoint(L.Callback):
    def __init__(
        self,
        root: Path,
        every: int,
        bundle,
        export_dtype=None,
        run_config: dict | None = None,
        wandb_id=None,
        export_merged: bool = False,
    ):
        """``export_dtype``: the torch dtype of the ``policy/`` export (None: the weights' own);
        ``state.ckpt`` always holds the (master) weights as they are trained. ``run_config``:
        the run's composed config, stored with every checkpoint. A LoRA policy's ``policy/`` is
        its adapter; ``export_merged`` adds ``merged/``, the model with the adapters merged."""
        self.root, self.every, self.bundle, self.export_dtype = Path(root), every, bundle, export_dtype
        self.export_merged = export_merged
        self.run_config, self.wandb_id = run_config, wandb_id
        self.last: Path | None = None

    def save(self, trainer, module) -> Path:
        from framework.distributed import full_state_dict_for_export, is_sharded

        d = self.root / _name(module.rl_step)
        tmp = d.with_name(d.name + PARTIAL)
        if trainer.is_global_zero and tmp.exists():
            shutil.rmtree(tmp)  # left by a run killed while writing
        trainer.strategy.barrier()
        log.info("apo-rl: writing checkpoint %s", d)
        trainer.save_checkpoint(str(tmp / "state.ckpt"))  # FSDP: a folder with one shard per rank
        # FSDP: the policy's shards gathered on every rank (a collective), written by rank 0
        full = full_state_dict_for_export(module.policy) if is_sharded(module.policy) else None
        if trainer.is_global_zero:
            from framework.models.lora import MERGED, is_lora, save_checkpoint_policy

            folders = ["policy"]
            if is_lora(module.policy):  # the adapter, and with export_merged the merged model
                save_checkpoint_policy(
                    module.policy, tmp, export_dtype=self.export_dtype, full_state_dict=full, merged=self.export_merged
                )
                folders += [MERGED] if self.export_merged else []
            else:
                if self.export_dtype is not None:  # e.g. fp32 master weights exported in bf16
                    sd = full if full is not None else module.policy.state_dict()
                    full = {k: v.to(self.export_dtype) if v.is_floating_point() else v for k, v in sd.items()}
                module.policy.save_pretrained(str(tmp / "policy"), state_dict=full)
            for f in folders:
                self.bundle.tokenizer.save_pretrained(str(tmp / f))
                ip = getattr(self.bundle.processor, "image_processor", None)
                if ip is not None:
                    ip.save_pretrained(str(tmp / f))
            if self.run_config is not None:
                (tmp / RUN_CONFIG).write_text(OmegaConf.to_yaml(OmegaConf.create(self.run_config)))
            info = RunInfo(rl_step=module.rl_step, output_dir=str(self.root.parent), wandb_id=self.wandb_id)
            (tmp / RUN_INFO).write_text(json.dumps(info.__dict__, indent=1))
        trainer.strategy.barrier()  # every rank's shard is on disk
        if trainer.is_global_zero:
            write_marker(tmp)
            if d.exists():
                shutil.rmtree(d)
            os.replace(tmp, d)  # atomic: the folder is complete or absent
        trainer.strategy.barrier()
        self.last = d
        return d

    # ---- preemption: SIGTERM (docker stop, timeout, SLURM at the end) and SIGUSR1 (SLURM's
    # early warning with sbatch --signal=USR1@90) finish the current RL step, write its
    # checkpoint and stop; framework.train raises Preempted (exit status 75)
    def on_train_start(self, trainer, module):
        import signal
        import threading

        self.preempted_by: str | None = None
        if threading.current_thread() is not threading.main_thread():
            return

        def handler(signum, frame):
            self.preempted_by = signal.Signals(signum).name
            log.warning("apo-rl: received %s: finishing this RL step, then checkpoint and stop", self.preempted_by)

        self._previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGUSR1)}

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        from framework.distributed import all_reduce

        flag = float(getattr(self, "preempted_by", None) is not None)
        if all_reduce([flag], "max")[0]:  # every rank stops at the same step
            self.preempted_by = self.preempted_by or "a signal on another rank"
            self.save(trainer, module)
            trainer.should_stop = True

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        # the checkpoint of step K is written when step K+1 starts, not when step K ends:
        # Lightning logs (and the CSV logger writes) a step's metrics after the batch-end
        # hooks, so a run killed right after checkpoint K has step K's metrics on disk
        k = module.rl_step
        if self.every and k > 0 and k % self.every == 0 and (self.last is None or self.last.name != _name(k)):
            self.save(trainer, module)

    def on_train_end(self, trainer, module):
        import signal

        for sig, prev in getattr(self, "_previous", {}).items():
            signal.signal(sig, prev)
        if self.last is None or self.last.name != _name(module.rl_step):
            self.save(trainer, module)


def _name(rl_step: int) -> str:
    return f"step-{rl_step:06d}"


def write_marker(d: Path) -> None:
    """``COMPLETE.json``: every file under ``d`` with its size, written last."""
    files = {str(p.relative_to(d)): p.stat().st_size for p in sorted(d.rglob("*")) if p.is_file()}
    (d / MARKER).write_text(json.dumps({"files": files}, indent=1))


def check_complete(d: Path) -> str | None:
    """Why checkpoint folder ``d`` is not complete (None when it is)."""
    marker = d / MARKER
    if not marker.is_file():
        return f"it has no {MARKER} (a checkpoint written by an older version, or one whose write was interrupted)"
    try:
        files = json.loads(marker.read_text())["files"]
    except (ValueError, KeyError) as e:
        return f"its {MARKER} is unreadable ({e})"
    for rel, size in files.items():
        p = d / rel
        if not p.is_file():
            return f"{rel} is missing"
        if p.stat().st_size != size:
            return f"{rel} has {p.stat().st_size} bytes, {size} when it was written (truncated?)"
    if not any(rel.startswith("policy/") for rel in files):
        return "its policy/ export is empty"
    return None


def _is_checkpoint(d: Path) -> bool:
    return d.is_dir() and d.name.startswith("step-") and not d.name.endswith(PARTIAL)


def find_checkpoint(resume: str | os.PathLike) -> Path:
    """The checkpoint folder ``resume`` names: a ``step-NNNNNN`` folder, its ``state.ckpt``, or
    a run folder (its newest complete checkpoint). Fails with the reason when there is none."""
    p = Path(str(resume)).expanduser()
    if p.name == "state.ckpt":
        p = p.parent
    if not p.exists():
        raise ConfigError(f"resume={resume}: no such file or folder")
    if (p / "checkpoints").is_dir() or p.name == "checkpoints":
        root = p if p.name == "checkpoints" else p / "checkpoints"
        steps = sorted((d for d in root.iterdir() if _is_checkpoint(d)), reverse=True)
        for d in steps:
            why = check_complete(d)
            if why is None:
                return d
            log.warning("apo-rl: skipping checkpoint %s: %s", d, why)
        raise ConfigError(
            f"resume={resume}: no complete checkpoint in {root} ({len(steps)} incomplete); start a new run instead"
        )
    if not (p / "state.ckpt").exists():
        raise ConfigError(
            f"resume={resume}: no checkpoint there (expected a run folder, a checkpoints/step-NNNNNN folder or its state.ckpt)"
        )
    why = check_complete(p)
    if why is not None:
        raise ConfigError(f"resume={resume}: the checkpoint is incomplete: {why}; resume from an earlier one")
    return p


def resolve_resume(resume, strategy: str = "auto") -> str | None:
    """Lightning's ``ckpt_path`` for ``resume`` (None: a new run)."""
    if not resume:
        return None
    d = find_checkpoint(resume)
    p = d / "state.ckpt"
    if p.is_dir() and not (p / "meta.pt").exists():
        raise ConfigError(f"resume={resume}: {p} holds no sharded checkpoint (no meta.pt)")
    if p.is_dir() and strategy != "fsdp":
        raise ConfigError(
            f"resume={resume} is a sharded FSDP checkpoint: resume it with trainer=fsdp (any number of "
            f"devices, trainer.devices=N), or start a new run from its Hugging Face export with "
            f"model.name_or_path={d / 'policy'}"
        )
    return str(p)


def run_info(d: Path) -> RunInfo | None:
    p = d / RUN_INFO
    return RunInfo(**json.loads(p.read_text())) if p.is_file() else None


# ----------------------------------------------------------------------------- resume = the same run
def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out or {prefix[:-1]: {}}
    return {prefix[:-1]: d}


def plain(cfg: DictConfig) -> dict:
    """The resolved config as plain containers, without Hydra's own node and ``output_dir``
    (which names the folder of whoever composed it)."""
    raw = OmegaConf.to_container(cfg, resolve=False)
    raw.pop("hydra", None)
    raw.pop("output_dir", None)
    return OmegaConf.to_container(OmegaConf.create(raw), resolve=True)


def _resumable(key: str) -> bool:
    return any(fnmatch.fnmatchcase(key, pat) or key.startswith(pat + ".") for pat in RESUMABLE)


def resume_config(cfg: DictConfig, explicit: dict[str, Any]) -> tuple[DictConfig, RunInfo | None, Path]:
    """The config of the run ``cfg.resume`` continues: the stored one, with the ``explicit``
    overrides (dotted key -> value, what the user set) that :data:`RESUMABLE` allows; any other
    override that differs from the stored value fails, listing the keys and their stored values."""
    d = find_checkpoint(cfg.resume)
    stored_path = d / RUN_CONFIG
    info = run_info(d)
    if not stored_path.is_file():  # a checkpoint without its config: the composed one, as before
        log.warning("apo-rl: %s has no %s: resuming with the config given on the command line", d, RUN_CONFIG)
        return cfg, info, d
    stored = OmegaConf.to_container(OmegaConf.load(stored_path), resolve=True)
    flat = _flat(stored)
    conflicts = []
    merged = OmegaConf.create(stored)
    for key, value in sorted(explicit.items()):
        if key in ("resume", "output_dir") or flat.get(key, object()) == value:
            continue
        if _resumable(key):
            OmegaConf.update(merged, key, value, force_add=True)
        else:
            conflicts.append(f"{key}={value!r} (stored: {flat.get(key, '<absent>')!r})")
    if conflicts:
        raise ConfigError(
            f"resume={cfg.resume} continues the stored run, whose config these overrides change: "
            f"{'; '.join(conflicts)}. Only the budget, evaluation, logging and hardware may change on resume "
            f"({', '.join(RESUMABLE[3:])}); to train something else start a new run from its weights "
            f"with model.name_or_path={d / 'policy'}"
        )
    merged.resume = str(d)
    out = explicit.get("output_dir") or (info.output_dir if info else None) or cfg.get("output_dir")
    merged.output_dir = str(out)
    if info is not None and int(merged.trainer.max_steps) <= info.rl_step:
        raise ConfigError(
            f"resume={cfg.resume}: the checkpoint is at RL step {info.rl_step} and trainer.max_steps="
            f"{merged.trainer.max_steps}: nothing left to train; set trainer.max_steps > {info.rl_step} to extend the run"
        )
    return merged, info, d


def explicit_overrides(cfg: DictConfig, default: DictConfig | None, hydra_overrides: list[str] | None) -> dict:
    """What the user set: every leaf of ``cfg`` that differs from the ``default`` composition,
    plus the leaves named by Hydra's command-line overrides (``hydra_overrides``: None when
    composed outside a Hydra app), with their values in ``cfg``; and ``output_dir`` when the
    user chose the folder (``output_dir=`` / ``hydra.run.dir=`` on the command line, or a
    literal ``output_dir`` in a composed config rather than Hydra's timestamp folder)."""
    now = _flat(plain(cfg))
    out = {}
    if default is not None:
        base = _flat(plain(default))
        out = {k: v for k, v in now.items() if base.get(k, object()) != v}
    for o in hydra_overrides or []:
        key = o.split("=", 1)[0].lstrip("+~")
        out.update({k: v for k, v in now.items() if k == key or k.startswith(key + ".")})
    raw_out = OmegaConf.to_container(cfg, resolve=False).get("output_dir")
    if hydra_overrides is not None:
        if any(o.split("=", 1)[0] in ("output_dir", "hydra.run.dir") for o in hydra_overrides):
            out["output_dir"] = str(cfg.output_dir)
    elif raw_out and "${" not in str(raw_out):
        out["output_dir"] = str(raw_out)
    return out
