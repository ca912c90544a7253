"""Checkpoints: ``checkpoints/step-NNNNNN/`` holds

    policy/          Hugging Face format (``from_pretrained``), with its tokenizer/processor,
                     in ``model.export_dtype`` (default: model.dtype); with LoRA the adapter
                     (``PeftModel.from_pretrained``), and with model.lora.export_merged also
                     merged/: the adapted model merged, in Hugging Face format
    state.ckpt       Lightning's checkpoint: the (master) weights as trained, optimizer, LR
                     scheduler, loop progress, RL step, RNG state
    run_config.yaml  the run's composed config: ``resume=`` alone continues *this* run
    run.json         the RL step, the W&B run id and the output folder it was written in
                     (informational: the folder a resume writes to is decided from where the
                     checkpoint is on disk, :func:`resume_config`)
    COMPLETE.json    written last: every file of the checkpoint with its size and sha256

A checkpoint is written into ``step-NNNNNN.partial/`` and renamed when complete, so a run
killed mid-write never leaves a folder that resume takes for a checkpoint. Resume checks every
file's size and sha256 against ``COMPLETE.json`` (the stored config and ``run.json``
included) before anything loads; a damaged file is one error naming it and the next complete
checkpoint. Cost: each file is hashed once after it is written (read back from the page
cache, sha256 at about 1.2 GB/s per core measured here; ``state.ckpt``, the largest, while the
policy export is being written, the others in parallel) and once more on resume: about a
second per GB of checkpoint, small next to writing it. A write that fails (disk full, a
read-only folder) removes the ``.partial`` folder and stops with one error naming the folder
and the cause; the previous checkpoints stay as they were.

``resume=<checkpoint folder>`` (or its ``state.ckpt``, or ``resume=<run folder>``: its newest
complete checkpoint) continues the run: :func:`resume_config` restores the stored config;
overrides may only change keys that do not change what is trained (:data:`RESUMABLE`). It
writes into the folder named with ``output_dir=`` / ``hydra.run.dir=``, else into the run
folder that holds the checkpoint (``<run>/checkpoints/step-NNNNNN``); a checkpoint outside a
run folder starts a new folder. A folder other than the checkpoint's own run starts its files
(metrics, checkpoints, W&B run) at the checkpoint's step and leaves the source run untouched;
a folder that already holds another run, or the same run's later checkpoints, is refused.
The plugins the stored run imports (``plugins:``) are imported only when named again.

Signals (:class:`RLCheckpoint`): SIGTERM / SIGUSR1 (preemption, exit 75) and SIGINT (Ctrl-C,
exit 130) stop the run with a checkpoint of its last completed RL step. An evaluation or a
rollout in progress is abandoned at once (on one process; the step is redone on resume), an
update in progress is finished: the stop takes at most the rest of one update plus writing
the checkpoint. A second Ctrl-C exits at once (130) without a checkpoint. A signal during the
final step or after the final checkpoint leaves a complete run (exit 0).

Under ``trainer.strategy=fsdp`` with ``trainer.fsdp.sharded_checkpoint=true``, ``state.ckpt``
is a folder of ``torch.distributed.checkpoint`` shards (one per rank, plus ``meta.pt``); it
resumes under FSDP on any number of devices (the shards are re-split on load), and
``policy/`` is the gathered Hugging Face export."""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import hashlib
import json
import logging
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
from omegaconf import DictConfig, OmegaConf

from framework.errors import ConfigError, Interrupted, Preempted, UserError

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
    "trainer.keep_last",
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
    complete: bool = False  # resume only: the checkpoint is the run's final one (nothing to train)
    checkpoint: Path | None = None  # resume only: the checkpoint folder


class CheckpointWriteError(UserError):
    """A checkpoint could not be written (disk full, a read-only folder): its ``.partial``
    folder is removed, the earlier checkpoints are as they were."""


class StopTraining(BaseException):
    """Raised by the signal handler inside an evaluation or a rollout (which change nothing
    that is trained): the step is abandoned, the checkpoint of the last completed step written
    (:meth:`RLCheckpoint.on_exception`). A BaseException: no ``except Exception`` swallows it."""

    def __init__(self, signame: str):
        super().__init__(signame)
        self.signame = signame


STOP_SIGNALS = ("SIGTERM", "SIGUSR1", "SIGINT")


def _abandonable(frame, module) -> bool:
    """Whether the main thread's ``frame`` is inside the module's evaluation or its rollout
    collection: code that changes no trained state (weights, optimizer, step counters), so a
    step stopped there is redone from the last checkpoint exactly."""
    from framework.rollout.collector import RolloutCollector

    while frame is not None:
        me = frame.f_locals.get("self") if frame.f_code.co_name in ("evaluate", "__call__") else None
        if me is not None and (me is module or isinstance(me, RolloutCollector)):
            return True
        frame = frame.f_back
    return False


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
        keep_last: int = 0,
        max_steps: int | None = None,
    ):
        """``export_dtype``: the torch dtype of the ``policy/`` export (None: the weights' own);
        ``state.ckpt`` always holds the (master) weights as they are trained. ``run_config``:
        the run's composed config, stored with every checkpoint. A LoRA policy's ``policy/`` is
        its adapter; ``export_merged`` adds ``merged/``, the model with the adapters merged.
        ``keep_last``: after each checkpoint only the newest ``keep_last`` complete ones are
        kept (0: all). ``max_steps``: the run's last RL step (a stop after it is a complete run)."""
        self.root, self.every, self.bundle, self.export_dtype = Path(root), every, bundle, export_dtype
        self.export_merged, self.keep_last, self.max_steps = export_merged, int(keep_last), max_steps
        self.run_config, self.wandb_id = run_config, wandb_id
        self.last: Path | None = None
        self.preempted_by: str | None = None
        self._previous: dict = {}
        self._module = None
        self._step_rng = None
        self._step_start: tuple[int, int] | None = None  # (RL step, last evaluated step) at the step's start
        self._watcher = None
        self._interrupts = 0
        self._world = 1

    # ------------------------------------------------------------------ writing
    def save(self, trainer, module) -> Path:
        d = self.root / _name(module.rl_step)
        tmp = d.with_name(d.name + PARTIAL)
        try:
            self._write(trainer, module, d, tmp)
        except OSError as e:
            if trainer.is_global_zero:
                shutil.rmtree(tmp, ignore_errors=True)
            raise CheckpointWriteError(_write_error(d, e, self.last)) from e
        self.last = d
        if trainer.is_global_zero and self.keep_last > 0:
            self._prune(keep=d)
        return d

    def _write(self, trainer, module, d: Path, tmp: Path) -> None:
        from framework.distributed import full_state_dict_for_export, is_sharded

        if trainer.is_global_zero and tmp.exists():
            shutil.rmtree(tmp)  # left by a run killed while writing
        trainer.strategy.barrier()
        log.info("apo-rl: writing checkpoint %s", d)
        trainer.save_checkpoint(str(tmp / "state.ckpt"))  # FSDP: a folder with one shard per rank
        # the largest file is hashed while the policy export is written (rank 0, one file)
        ahead = (
            _HASHER.submit(_sha256, tmp / "state.ckpt")
            if trainer.is_global_zero and (tmp / "state.ckpt").is_file()
            else None
        )
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
            info = {"rl_step": module.rl_step, "output_dir": str(self.root.parent), "wandb_id": self.wandb_id}
            (tmp / RUN_INFO).write_text(json.dumps(info, indent=1))
        trainer.strategy.barrier()  # every rank's shard is on disk
        if trainer.is_global_zero:
            write_marker(tmp, known={"state.ckpt": ahead.result()} if ahead is not None else None)
            if d.exists():
                shutil.rmtree(d)
            os.replace(tmp, d)  # atomic: the folder is complete or absent
        trainer.strategy.barrier()

    def _prune(self, keep: Path) -> None:
        """Keep the newest ``keep_last`` complete checkpoints (by RL step, ``keep`` always)."""
        done = sorted((c for c in self.root.iterdir() if _is_checkpoint(c) and (c / MARKER).is_file()), reverse=True)
        for old in done[self.keep_last :]:
            if old != keep and _step_of(old) < _step_of(keep):
                log.info("apo-rl: removing checkpoint %s (trainer.keep_last=%d)", old, self.keep_last)
                shutil.rmtree(old, ignore_errors=True)

    # ------------------------------------------------------------------ periodic checkpoints
    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if self.preempted_by is not None and trainer.world_size == 1:
            raise StopTraining(self.preempted_by)  # arrived between two steps: stop before the next one
        # the checkpoint of step K is written when step K+1 starts, not when step K ends:
        # Lightning logs (and the CSV logger writes) a step's metrics after the batch-end
        # hooks, so a run killed right after checkpoint K has step K's metrics on disk
        k = module.rl_step
        if self.every and k > 0 and k % self.every == 0 and (self.last is None or self.last.name != _name(k)):
            self.save(trainer, module)
        # the RNG state the step starts from (a resumed run's first step: the restored one):
        # a step abandoned in its rollout leaves a checkpoint that redoes it exactly
        import torch

        pending = getattr(module, "_pending_rng", None)
        self._step_rng = pending if pending is not None else torch.get_rng_state()
        self._step_start = (module.rl_step, getattr(module, "_last_eval_step", -1))

    # ---- signals: SIGTERM (docker stop, timeout, SLURM at the end) and SIGUSR1 (SLURM's early
    # warning with sbatch --signal=USR1@90): checkpoint and stop, exit 75; SIGINT (Ctrl-C): the
    # same, exit 130, and a second Ctrl-C exits at once. An evaluation or a rollout in progress
    # is abandoned (one process: under DDP / FSDP every rank finishes the step, so that the
    # collectives stay matched); an update in progress is finished.
    def on_train_start(self, trainer, module):
        import signal
        import threading

        self._module, self._world = module, trainer.world_size
        if threading.current_thread() is not threading.main_thread():
            return
        self._previous = {getattr(signal, n): signal.signal(getattr(signal, n), self._on_signal) for n in STOP_SIGNALS}

    def _on_signal(self, signum, frame):
        import signal

        name = signal.Signals(signum).name
        if self._watcher is not None and self._watcher.poked.is_set():
            self._watcher.poked.clear()  # the watcher's poke: the main thread may be abandonable now
        elif self.complete():  # the final checkpoint is written: the run stays complete
            if name == "SIGINT" and self._interrupts:
                _write_now("apo-rl: Ctrl-C again: exiting now (the run is complete)\n")
                os._exit(130)
            self._interrupts += name == "SIGINT"
            _write_now(f"apo-rl: received {name}: the run is complete, finishing up\n")
            return
        elif self.preempted_by is not None:
            if name == "SIGINT":
                _write_now("apo-rl: Ctrl-C again: exiting now, without a checkpoint\n")
                os._exit(130)
            _write_now(f"apo-rl: received {name} again: already stopping\n")
            return
        else:
            self.preempted_by = name
            self._interrupts += name == "SIGINT"
            log.warning(
                "apo-rl: received %s: stopping with a checkpoint of the last completed RL step%s",
                "Ctrl-C" if name == "SIGINT" else name,
                " (Ctrl-C again: exit at once, without a checkpoint)" if name == "SIGINT" else "",
            )
        if self._world != 1 or self._module is None:
            return
        if _abandonable(frame, self._module):
            self._stop_watcher()
            raise StopTraining(self.preempted_by)
        if self._watcher is None:  # in an update: abandon what follows it (the final evaluation)
            self._watcher = _Watcher(signum, self._module)
            self._watcher.start()

    def _stop_watcher(self) -> None:
        if self._watcher is not None:
            self._watcher.stop()

    def complete(self) -> bool:
        """Whether the run's final checkpoint is written."""
        return self.max_steps is not None and self.last is not None and self.last.name == _name(self.max_steps)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        from framework.distributed import all_reduce

        flag = float(self.preempted_by is not None)
        if all_reduce([flag], "max")[0]:  # every rank stops at the same step
            self._stop_watcher()
            self.preempted_by = self.preempted_by or "a signal on another rank"
            self.save(trainer, module)
            trainer.should_stop = True

    def on_exception(self, trainer, module, exception):
        self._stop_watcher()
        if not isinstance(exception, StopTraining):
            return
        if self._step_start is not None:
            step, evaluated = self._step_start
            if hasattr(module, "_last_eval_step"):  # an abandoned evaluation is redone on resume
                module._last_eval_step = evaluated
            if module.rl_step == step and self._step_rng is not None:  # the RNG as the abandoned step found it
                import torch

                torch.set_rng_state(self._step_rng)
        if self.last is None or self.last.name != _name(module.rl_step):
            self.save(trainer, module)

    def on_train_end(self, trainer, module):
        self._stop_watcher()
        if self.last is None or self.last.name != _name(module.rl_step):
            self.save(trainer, module)

    def restore_signals(self) -> None:
        """The handlers from before training (called when the run's teardown is over: until
        then a signal after the final checkpoint leaves the run complete)."""
        import signal

        self._stop_watcher()
        for sig, prev in self._previous.items():
            signal.signal(sig, prev)
        self._previous = {}

    def stop_error(self, rl_step: int, out: Path) -> UserError | None:
        """After training returned: the error to exit with when a signal stopped the run before
        its final step (75 preempted, 130 Ctrl-C); None when the run is complete."""
        if self.preempted_by is None:
            return None
        if self.max_steps is not None and rl_step >= self.max_steps:
            log.warning(
                "apo-rl: %s arrived during the final RL step: the run is complete (checkpoint %s)%s",
                self.preempted_by,
                self.last,
                "; its final evaluation was interrupted: python -m benchmarks.evaluate evaluates the checkpoint"
                if self._module is not None and getattr(self._module, "_last_eval_step", rl_step) != rl_step
                else "",
            )
            return None
        if self.preempted_by == "SIGINT":
            return Interrupted(
                f"interrupted (Ctrl-C) after RL step {rl_step}: checkpoint {self.last}; continue with resume={out}"
            )
        return Preempted(
            f"preempted by {self.preempted_by} after RL step {rl_step}: checkpoint {self.last}; "
            f"continue with resume={out}"
        )


class _Watcher:
    """After a signal during an update (one process): pokes the main thread with the same
    signal as soon as it is in an evaluation or a rollout, where the handler abandons it."""

    def __init__(self, signum: int, module):
        import threading

        self.signum, self.module = signum, module
        self.poked, self._stop = threading.Event(), threading.Event()
        self._main = threading.main_thread().ident
        self._thread = threading.Thread(target=self._run, name="apo-rl-stop", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        import signal
        import sys

        while not self._stop.wait(0.1):
            frame = sys._current_frames().get(self._main)
            if frame is not None and not self.poked.is_set() and _abandonable(frame, self.module):
                self.poked.set()
                signal.pthread_kill(self._main, self.signum)


def _write_now(msg: str) -> None:
    """Write from a signal handler (no print, no logging: they may hold a lock)."""
    if msg:
        with contextlib.suppress(OSError):
            os.write(2, msg.encode())


def _write_error(d: Path, e: OSError, last: Path | None) -> str:
    cause = errno.errorcode.get(e.errno, str(e.errno)) if e.errno is not None else type(e).__name__
    where = f" ({e.filename})" if e.filename else ""
    prev = (
        f"the previous checkpoint {last} is intact: continue with resume={last.parent.parent} once the folder is writable"
        if last is not None and (last / MARKER).is_file()
        else "no earlier checkpoint of this run"
    )
    return (
        f"could not write checkpoint {d.name} into {d.parent}: {e.strerror or e} [{cause}]{where}; "
        f"the partial checkpoint was removed; {prev}"
    )


def _name(rl_step: int) -> str:
    return f"step-{rl_step:06d}"


def _step_of(d: Path) -> int:
    try:
        return int(d.name.split("-", 1)[1].split(".")[0])
    except (IndexError, ValueError):
        return -1


_HASHER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="apo-rl-sha256")


def _sha256(p: Path) -> str:
    h = hashlib.sha256()
    with p.open("rb") as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)  # releases the GIL: files hash in parallel threads
    return h.hexdigest()


def _hashes(root: Path, rels: list[str]) -> dict[str, str]:
    if not rels:
        return {}
    with ThreadPoolExecutor(max_workers=min(8, len(rels))) as pool:
        return dict(zip(rels, pool.map(lambda r: _sha256(root / r), rels)))


def write_marker(d: Path, known: dict[str, str] | None = None) -> None:
    """``COMPLETE.json``: every file under ``d`` with its size and sha256, written last
    (``known``: sha256 already computed, by relative path)."""
    rels = [str(p.relative_to(d)) for p in sorted(d.rglob("*")) if p.is_file() and p.name != MARKER]
    known = known or {}
    sums = {**_hashes(d, [r for r in rels if r not in known]), **{r: h for r, h in known.items() if r in rels}}
    files = {r: {"size": (d / r).stat().st_size, "sha256": sums[r]} for r in rels}
    (d / MARKER).write_text(json.dumps({"files": files}, indent=1))


_VERIFIED: dict[tuple[str, int, int], None] = {}  # (folder, marker mtime, size): hashes already checked


def check_complete(d: Path, verify_hashes: bool = False) -> str | None:
    """Why checkpoint folder ``d`` is not complete (None when it is): every file of its
    ``COMPLETE.json`` present with its size, and with ``verify_hashes`` its sha256."""
    problem = _problem(d, verify_hashes)
    return problem[1] if problem else None


def _problem(d: Path, verify_hashes: bool) -> tuple[str, str] | None:
    """(kind, why): kind "incomplete" (never finished writing) or "damaged" (changed since)."""
    marker = d / MARKER
    if not marker.is_file():
        return (
            "incomplete",
            f"it has no {MARKER} (a checkpoint written by an older version, or one whose write was interrupted)",
        )
    try:
        files = json.loads(marker.read_text())["files"]
        entries = {rel: v if isinstance(v, dict) else {"size": int(v)} for rel, v in files.items()}
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        return "damaged", f"its {MARKER} is unreadable ({e})"
    for rel, v in entries.items():
        p = d / rel
        if not p.is_file():
            return "damaged", f"{rel} is missing"
        if p.stat().st_size != v.get("size"):
            return "damaged", f"{rel} has {p.stat().st_size} bytes, {v.get('size')} when it was written (truncated?)"
    if not any(rel.startswith("policy/") for rel in entries):
        return "damaged", "its policy/ export is empty"
    st = marker.stat()
    key = (str(d.resolve()), st.st_mtime_ns, st.st_size)
    if verify_hashes and key not in _VERIFIED:
        hashed = [rel for rel, v in entries.items() if "sha256" in v]
        if not hashed:
            log.warning("apo-rl: %s lists no sha256 (an older checkpoint): only the sizes are checked", d)
        for rel, got in _hashes(d, hashed).items():
            if got != entries[rel]["sha256"]:
                return (
                    "damaged",
                    f"{rel} differs from when it was written (sha256 {got[:12]}..., written {entries[rel]['sha256'][:12]}...)",
                )
        _VERIFIED[key] = None
    return None


def _is_checkpoint(d: Path) -> bool:
    return d.is_dir() and d.name.startswith("step-") and not d.name.endswith(PARTIAL)


def _next_complete(d: Path) -> Path | None:
    """The newest verified checkpoint older than ``d`` in the same folder."""
    older = sorted((c for c in d.parent.iterdir() if _is_checkpoint(c) and _step_of(c) < _step_of(d)), reverse=True)
    return next((c for c in older if _problem(c, True) is None), None)


def _damaged(resume, d: Path, why: str) -> ConfigError:
    nxt = _next_complete(d)
    use = (
        f"resume from the next complete checkpoint: resume={nxt}"
        if nxt
        else "no earlier complete checkpoint: start a new run"
    )
    return ConfigError(f"resume={resume}: checkpoint {d} is damaged: {why}; {use}")


def find_checkpoint(resume: str | os.PathLike) -> Path:
    """The checkpoint folder ``resume`` names: a ``step-NNNNNN`` folder, its ``state.ckpt``, or
    a run folder (its newest complete checkpoint), checked file by file against its sha256.
    Fails with the reason when there is none, and on a damaged one (a file changed since it was
    written) with the next complete checkpoint to use."""
    p = Path(str(resume)).expanduser()
    if p.name == "state.ckpt":
        p = p.parent
    if not p.exists():
        raise ConfigError(f"resume={resume}: no such file or folder")
    if (p / "checkpoints").is_dir() or p.name == "checkpoints":
        root = p if p.name == "checkpoints" else p / "checkpoints"
        steps = sorted((d for d in root.iterdir() if _is_checkpoint(d)), key=_step_of, reverse=True)
        for d in steps:
            problem = _problem(d, True)
            if problem is None:
                return d
            if problem[0] == "damaged":
                raise _damaged(resume, d, problem[1])
            log.warning("apo-rl: skipping checkpoint %s: %s", d, problem[1])
        raise ConfigError(
            f"resume={resume}: no complete checkpoint in {root} ({len(steps)} incomplete); start a new run instead"
        )
    if not (p / "state.ckpt").exists():
        raise ConfigError(
            f"resume={resume}: no checkpoint there (expected a run folder, a checkpoints/step-NNNNNN folder or its state.ckpt)"
        )
    problem = _problem(p, True)
    if problem is not None and problem[0] == "damaged":
        raise _damaged(resume, p, problem[1])
    if problem is not None:
        raise ConfigError(f"resume={resume}: the checkpoint is incomplete: {problem[1]}; resume from an earlier one")
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
    if not p.is_file():
        return None
    raw = json.loads(p.read_text())
    return RunInfo(**{k: raw[k] for k in ("rl_step", "output_dir", "wandb_id") if k in raw})


def run_folder_of(d: Path) -> Path | None:
    """The run folder that holds checkpoint ``d`` on disk (``<run>/checkpoints/step-NNNNNN``),
    None for a checkpoint elsewhere (copied, downloaded)."""
    d = d.resolve()
    return d.parent.parent if d.parent.name == "checkpoints" else None


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
    override that differs from the stored value fails, listing the keys and their stored values.

    The returned :class:`RunInfo` says where the run goes (``output_dir``, see
    :func:`resume_folder`), its W&B run (None: a new one, for a folder other than the
    checkpoint's run) and whether the run is already ``complete`` (its final checkpoint)."""
    d = find_checkpoint(cfg.resume)
    stored_path = d / RUN_CONFIG
    info = run_info(d)
    if not stored_path.is_file():  # a checkpoint without its config: the composed one, as before
        log.warning("apo-rl: %s has no %s: resuming with the config given on the command line", d, RUN_CONFIG)
        merged = cfg.copy()
    else:
        merged = _merge_stored(cfg, d, OmegaConf.to_container(OmegaConf.load(stored_path), resolve=True), explicit)
    merged.resume = str(d)
    named = explicit.get("output_dir")
    default = cfg.get("output_dir") if not named and run_folder_of(d) is None else None  # Hydra's new folder
    out, same = resume_folder(d, named, default, info)
    merged.output_dir = str(out)
    if info is None:  # a checkpoint without run.json (an older version): no step to check
        return merged, None, d
    info = RunInfo(
        rl_step=info.rl_step,
        output_dir=str(out),
        wandb_id=info.wandb_id if same else None,  # another folder: its own W&B run
    )
    if int(merged.trainer.max_steps) <= info.rl_step:
        if int(merged.trainer.max_steps) == info.rl_step:  # its final checkpoint: a finished run
            info.complete = True
            return merged, info, d
        raise ConfigError(
            f"resume={cfg.resume}: the checkpoint is at RL step {info.rl_step} and trainer.max_steps="
            f"{merged.trainer.max_steps}: nothing left to train; set trainer.max_steps > {info.rl_step} to extend the run"
        )
    return merged, info, d


def _merge_stored(cfg: DictConfig, d: Path, stored: dict, explicit: dict[str, Any]) -> DictConfig:
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
    # a plugin is code: the stored run's plugins are imported only when named again
    from framework.registry import plugin_modules

    stored_plugins = plugin_modules(stored.get("plugins"))  # `plugins=my_module` is one module
    named = plugin_modules(explicit.get("plugins"))
    missing = [m for m in stored_plugins if m not in named]
    if missing:
        raise ConfigError(
            f"resume={cfg.resume}: the stored run imports the plugin module(s) {', '.join(missing)} "
            f"(its config's plugins:), and importing a module runs its code: name them again to import them, "
            f"plugins=[{','.join(stored_plugins)}]"
        )
    return merged


def _holds_run(folder: Path) -> list[str]:
    """What in ``folder`` belongs to a run (its metrics, its checkpoints)."""
    found = []
    if (folder / "csv" / "metrics.csv").is_file():
        found.append("csv/metrics.csv")
    ck = folder / "checkpoints"
    if ck.is_dir() and any(_is_checkpoint(c) for c in ck.iterdir()):
        found.append("checkpoints/")
    return found


def resume_folder(d: Path, named: str | None, default: str | None, info: RunInfo | None) -> tuple[Path, bool]:
    """The folder a resume from checkpoint ``d`` writes into, and whether it is the folder of
    the checkpoint's own run: the folder the user ``named`` (``output_dir=``,
    ``hydra.run.dir=``), else the run folder that holds ``d`` on disk (never ``run.json``'s
    word alone), else - a checkpoint outside a run folder - the new run's ``default`` folder.
    Refused: another folder that already holds a run (its metrics or checkpoints would be
    replaced), and the checkpoint's own run when it has later checkpoints (they would be
    replaced: resume from the newest, or into a new folder)."""
    src = run_folder_of(d)
    if named:
        out = Path(str(named)).expanduser().resolve()
    elif src is not None:
        out = src
    else:
        out = Path(str(default or "outputs/run")).expanduser().resolve()
        log.info("apo-rl: %s is not inside a run folder (<run>/checkpoints/): this run writes into %s", d, out)
    if info is not None and src is None and Path(info.output_dir).resolve() != out:
        log.info("apo-rl: %s was written by the run in %s, which stays untouched", d, info.output_dir)
    same = src is not None and out == src
    if not same:
        there = _holds_run(out)
        if there:
            raise ConfigError(
                f"resume={d}: the output folder {out} already holds a run ({', '.join(there)}), which this run "
                "would overwrite: name an empty or new folder (hydra.run.dir=<folder> or output_dir=<folder>)"
            )
        return out, False
    step = _step_of(d)
    later = sorted(c.name for c in (src / "checkpoints").iterdir() if _is_checkpoint(c) and _step_of(c) > step)
    if later:
        raise ConfigError(
            f"resume={d}: its run {src} has later checkpoints ({', '.join(later)}), which continuing it from "
            f"{d.name} would replace (and its metrics after step {step}): continue from the newest "
            f"(resume={src}), or into a new folder with hydra.run.dir=<folder> (its files start at step {step})"
        )
    return out, True


def explicit_overrides(
    cfg: DictConfig, default: DictConfig | None, hydra_overrides: list[str] | None, named_dir: str | None = None
) -> dict:
    """What the user set: every leaf of ``cfg`` that differs from the ``default`` composition,
    plus the leaves named by Hydra's command-line overrides (``hydra_overrides``: None when
    composed outside a Hydra app), with their values in ``cfg``; and ``output_dir`` when the
    user chose the folder (``output_dir=`` on the command line; ``named_dir``: the folder
    ``hydra.run.dir=`` named, which Hydra keeps out of the task overrides; or a literal
    ``output_dir`` in a composed config rather than Hydra's timestamp folder)."""
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
        if named_dir:
            out["output_dir"] = str(named_dir)
        if any(o.split("=", 1)[0].lstrip("+") == "output_dir" for o in hydra_overrides):
            out["output_dir"] = str(cfg.output_dir)
    elif raw_out and "${" not in str(raw_out):
        out["output_dir"] = str(raw_out)
    return out


def named_run_dir(hydra_overrides: list[str], runtime_output_dir: str) -> str | None:
    """The output folder when Hydra's own overrides (``HydraConfig.get().overrides.hydra``)
    name it (``hydra.run.dir=``, ``hydra.sweep.dir=``/``subdir=``): Hydra's runtime output
    folder; None when Hydra chose it (its timestamp folder)."""
    keys = ("hydra.run.dir", "hydra.sweep.dir", "hydra.sweep.subdir")
    return runtime_output_dir if any(o.split("=", 1)[0].lstrip("+") in keys for o in hydra_overrides) else None
