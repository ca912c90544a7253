"""Run a benchmark suite: ``python -m benchmarks.run suite=<name> [suite.steps=5 suite.seeds=[0]]``
(installed as the command ``apo-rl-sweep``).

A suite (configs/suite/<name>.yaml) fixes the grid (``algorithms`` x ``seeds`` x ``tasks``), the
budget (``steps``), the evaluation (``eval``) and the overrides every run gets. Each
combination runs as its own ``python -m framework.run`` process (a crash or a bad config
fails that run only) in ``<sweep_dir>/<task>/<algorithm>/seed<k>/``, logging to W&B (offline
by default) in one group per sweep with the algorithm and seed in its config.

* A finished run leaves ``DONE.json`` (its final metrics and its command); re-running the same
  sweep skips it. A sweep never deletes a finished run: when a finished run's command differs
  from the one the sweep would give it now (another ``suite.steps``, other overrides, ...), the
  sweep refuses to start with one ``error:`` line naming those runs and what differs; run it
  into another ``sweep_dir=``, or give ``replace=true`` to run them again (the finished folder
  is then kept, renamed ``seed<k>.replaced-<time>``, never deleted).
* A run counts as finished when it exits 0, or when its final checkpoint
  (``checkpoints/step-<max_steps>``) is complete (its ``COMPLETE.json`` checks out) and its
  metrics can be read: a run preempted during its final step or signalled during the
  teardown after its final checkpoint is recorded as done, whatever its exit status.
* Before any run starts, every run's config is composed (Hydra's compose API on configs/, the
  run's overrides) and checked by :func:`framework.train.check_early` (values, registered
  names, reward parameters; no model loads): a mistyped algorithm, group option or key fails
  the sweep at once, listing every run it affects, and nothing runs (``dry_run=true`` prints
  the problems as a warning, and what the sweep would do with every run: run, skip, resume,
  retry, refuse or replace, with its command).
* A failed run leaves ``FAILED.json``: its return code, its own error (the ``error: ...`` line
  the CLI printed, the exception line of its traceback, or ``killed by SIGSEGV`` for a run a
  signal killed; see :func:`error_message`) and the path of its ``console.log`` (the full
  output); the sweep goes on, and the next sweep retries it (``rerun_failed=false`` keeps it
  as failed).
* Ctrl-C (SIGINT), SIGTERM or SIGUSR1 to the sweep is passed on, once, to each running run
  (the runs run in their own process group, so a terminal's Ctrl-C reaches them only through
  the sweep), which writes a checkpoint and stops; the sweep records them in
  ``INTERRUPTED.json``, starts no further run and exits 130 (SIGINT) or 75 (SIGTERM /
  SIGUSR1, "requeue"). Running the same command again resumes them from their newest complete
  checkpoint (a run interrupted before its first checkpoint starts over).
* The sweep's console (progress and results, one line per run) is also appended to
  ``<sweep_dir>/console.log``.
* At the end ``<sweep_dir>/report.md`` and ``<sweep_dir>/plots/`` (PNG + PDF + the plotted data
  as CSV) are written and logged to W&B (benchmarks/report.py; ``python -m benchmarks.report
  <sweep_dir>`` regenerates them); an interrupted sweep leaves that to its next run.

The exit status is 1 when a run failed. ``suite.jobs=N`` runs N processes at a time
(``suite.env`` sets environment variables for them, e.g. ``OMP_NUM_THREADS``); for a cluster
use Hydra's launchers on ``python -m framework.run -m ...`` (see README, "Benchmark suites").
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from framework.errors import EXIT_PREEMPTED, ConfigError
from framework.loggers import without_wandb_service
from framework.resources import HYDRA_CONFIG_PATH, compose_config
from framework.run import entry_command

DONE, FAILED, LOG, INTERRUPTED = "DONE.json", "FAILED.json", "console.log", "INTERRUPTED.json"
STARTED = "STARTED.json"  # written when a run starts (its command), removed when it ends
SUITE_FILE = "suite.yaml"


@dataclass
class Run:
    task: str
    algorithm: str
    seed: int
    run_dir: Path
    command: list[str]
    status: str = "pending"  # pending | done | skipped | failed | interrupted (preempted: resumed on re-run)
    error: str | None = None
    wall_s: float = 0.0
    cpu_s: float = 0.0
    summary: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{self.task}/{self.algorithm}/seed{self.seed}"


def _key(override: str) -> str:
    return override.lstrip("+~").split("=", 1)[0]


def merge_overrides(*groups) -> list[str]:
    """Concatenate override lists; a later override of the same key replaces an earlier one."""
    out: dict[str, str] = {}
    for g in groups:
        for o in g or []:
            o = str(o)
            out.pop(_key(o), None)
            out[_key(o)] = o
    return list(out.values())


def suite_dict(cfg: DictConfig) -> dict:
    s = OmegaConf.to_container(cfg.suite, resolve=True)
    for key in ("name", "algorithms", "seeds", "steps", "tasks"):
        if key not in s or s[key] in (None, [], {}):
            raise ValueError(f"suite.{key} is missing or empty (configs/suite/{s.get('name', '?')}.yaml)")
    if not isinstance(s["tasks"], dict):
        raise ValueError("suite.tasks must map a task name to its list of overrides")
    return s


def plan(s: dict, sweep_dir: Path) -> list[Run]:
    """Every (task, algorithm, seed) run with its command."""
    ev = s.get("eval") or {}
    lg = s.get("logger") or {}
    group = s.get("group") or sweep_dir.name
    runs = []
    for task, task_overrides in s["tasks"].items():
        for algo in s["algorithms"]:
            for seed in s["seeds"]:
                run_dir = sweep_dir / task / algo / f"seed{seed}"
                base = [
                    f"algorithm={algo}",
                    f"seed={seed}",
                    f"trainer.max_steps={s['steps']}",
                    "trainer.progress_bar=false",
                ]
                evo = [
                    f"trainer.{k}={ev[v]}"
                    for k, v in (("eval_every", "every"), ("eval_size", "size"), ("eval_pass_k", "pass_k"))
                    if ev.get(v) is not None
                ]
                if ev.get("samples") is not None:
                    evo.append(f"trainer.eval_samples={ev['samples']}")
                log = [
                    f"logger.wandb={str(bool(lg.get('wandb', True))).lower()}",
                    f"logger.wandb_mode={lg.get('wandb_mode', 'offline')}",
                    f"logger.project={lg.get('project', 'apo-rl')}",
                    f"logger.group={group}",
                    f"logger.name={task}-{algo}-seed{seed}",
                    f"logger.tags=[{s['name']},{task},{algo},seed{seed}]",
                ]
                overrides = merge_overrides(
                    base,
                    evo,
                    s.get("overrides"),
                    task_overrides,
                    (s.get("algorithm_overrides") or {}).get(algo),
                    log,
                    [f"output_dir={run_dir}", f"hydra.run.dir={run_dir}"],
                )
                runs.append(Run(task, algo, int(seed), run_dir, entry_command("framework.run", *overrides)))
    return runs


HYDRA_HINT = "Set the environment variable HYDRA_FULL_ERROR"
_NOISE = (HYDRA_HINT, "(set APO_RL_DEBUG", "See https://hydra.cc/")


def clean_hydra_message(text: str) -> str:
    """A Hydra composition error as one line: its message without the config search path,
    the listing of a group's options folded into ``(available: a, b, ...)``."""
    out: list[str] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        ln = lines[i].rstrip()
        head = ln.strip()
        if head == "Config search path:" or head.startswith("Available options in "):
            opts = []
            i += 1
            while i < len(lines) and lines[i][:1] in ("\t", " ") and lines[i].strip():
                opts.append(lines[i].strip())
                i += 1
            if head.startswith("Available options in ") and opts:
                out.append(f"(available: {', '.join(opts)})")
            continue
        if head and not head.startswith(_NOISE):
            out.append(head)
        i += 1
    return " ".join(out)


def error_message(log_text: str, limit: int = 400) -> str:
    """A failed run's own error from its console output, as one line: the last ``error: ...``
    line the CLI printed (a :class:`framework.errors.UserError`), else the exception line of the
    last traceback (``ValueError: ...``), else Hydra's composition error (its message, without
    the config search path), else the last lines of output."""
    lines = log_text.splitlines()
    if lines and lines[0].startswith("$ "):  # the command line benchmarks.run writes first
        lines = lines[1:]
    for ln in reversed(lines):
        if ln.strip().startswith("error: "):
            return ln.strip()[len("error: ") :][:limit]
    tb = [i for i, ln in enumerate(lines) if ln.startswith("Traceback (most recent call last):")]
    if tb:  # the frames are indented; the exception line is the first one that is not
        for ln in lines[tb[-1] + 1 :]:
            if ln.strip() and not ln[:1].isspace():
                return ln.strip()[:limit]
    hint = [i for i, ln in enumerate(lines) if ln.startswith(HYDRA_HINT)]
    if hint:  # Hydra's message: the paragraph(s) before the hint, less the search path
        block: list[str] = []
        for ln in reversed(lines[: hint[-1]]):
            if not ln.strip() and block and not block[-1].startswith(("\t", " ", "Available options", "Config search")):
                break
            block.append(ln)
        msg = clean_hydra_message("\n".join(reversed(block)))
        if msg:
            return msg[:limit]
    rest = [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith(_NOISE)]
    return " / ".join(rest[-3:])[:limit] or "no output"


def exception_message(e: BaseException) -> str:
    """One line for an exception raised while composing or checking a run's config."""
    from hydra.errors import HydraException

    from framework.errors import UserError, one_line

    if isinstance(e, UserError):
        return one_line(e)
    if isinstance(e, HydraException):
        msg = clean_hydra_message(str(e))
        cause = e.__cause__
        if cause is not None and str(cause).strip():
            msg += f" ({str(cause).strip().splitlines()[0]})"
        return msg or type(e).__name__
    return f"{type(e).__name__}: {one_line(e)}"


# ----------------------------------------------------------------------------- the console
CONSOLE = "console.log"  # <sweep_dir>/console.log: the sweep's own console lines, as printed
_CONSOLE_FILE: list[Path] = []  # set while a sweep runs


def say(line: str) -> None:
    """Print one line of the sweep's console (progress and results) and append it to
    ``<sweep_dir>/console.log``."""
    print(line, flush=True)
    _append_console(line)


def _append_console(line: str) -> None:
    for path in _CONSOLE_FILE:
        with contextlib.suppress(OSError):  # one os.write: safe from a signal handler too
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, (line.rstrip("\n") + "\n").encode())
            finally:
                os.close(fd)


# ----------------------------------------------------------------------------- signals
# Ctrl-C (SIGINT), SIGTERM or SIGUSR1 to the sweep is passed on to the running runs (each runs in
# its own process group: a terminal's Ctrl-C reaches a run only through the sweep, once), which
# write a checkpoint and exit as interrupted; runs not started yet are left for the next sweep
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)
EXIT_SIGINT = 130  # 128 + SIGINT, as a shell reports a Ctrl-C
_STOP = threading.Event()
_STOPPED_BY: list[str] = []  # the names of the signals the sweep received, in order
_RUNNING: set[subprocess.Popen] = set()


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def _on_stop_signal(signum, frame) -> None:
    name = _signal_name(signum)
    first = not _STOP.is_set()
    _STOPPED_BY.append(name)
    _STOP.set()
    what = f"{name} (Ctrl-C)" if signum == signal.SIGINT else name
    msg = (
        f"benchmarks.run: {what}: passing it on to the running run(s), which checkpoint and stop; "
        "no further run starts; run the same command again to resume\n"
        if first
        else f"benchmarks.run: {what} again: passing it on\n"
    )
    with contextlib.suppress(OSError):
        os.write(2, msg.encode())  # not print(): a signal handler may interrupt a print
    _append_console(msg)
    for proc in list(_RUNNING):
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signum)


@contextlib.contextmanager
def stop_signals_forwarded():
    """While running the sweep's runs (main thread only): SIGINT / SIGTERM / SIGUSR1 set the
    stop flag and are passed on to every running run; the previous handlers come back after."""
    _STOP.clear()
    _STOPPED_BY.clear()
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, _on_stop_signal) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, prev in previous.items():
            signal.signal(sig, prev)


def stop_reason() -> str:
    """``"SIGINT (Ctrl-C) to the sweep"``: why the sweep stopped its runs."""
    name = _STOPPED_BY[0] if _STOPPED_BY else "a signal"
    return f"{name}{' (Ctrl-C)' if name == 'SIGINT' else ''} to the sweep"


# ----------------------------------------------------------------------------- run folders
def _read_json(p: Path) -> dict | None:
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return None


def _write_json(p: Path, obj: dict) -> None:
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, p)  # a marker is complete or absent


def run_args(run: Run) -> list[str]:
    """The run's overrides (its command without the interpreter and the entry point)."""
    return run.command[3:]


def _override_value(args: list[str], key: str) -> str | None:
    vals = [o.split("=", 1)[1] for o in args if "=" in o and _key(o) == key]
    return vals[-1] if vals else None


def command_difference(old: list[str], new: list[str]) -> str:
    """What differs between two runs' overrides, one line: ``trainer.max_steps 4 -> 8, +x=1 (new)``."""
    o = {_key(a): a for a in old}
    n = {_key(a): a for a in new}
    parts = []
    for k in dict.fromkeys([*o, *n]):
        if o.get(k) == n.get(k):
            continue
        if k not in o:
            parts.append(f"{n[k]} (new)")
        elif k not in n:
            parts.append(f"{o[k]} (no longer given)")
        else:
            ov, nv = (x.split("=", 1)[1] if "=" in x else x for x in (o[k], n[k]))
            parts.append(f"{k} {ov} -> {nv}")
    return ", ".join(parts) or "the order of the overrides"


def final_checkpoint(run_dir: Path, args: list[str]) -> Path | None:
    """The run's final checkpoint (``checkpoints/step-<trainer.max_steps>``) when it is complete
    (:func:`framework.checkpoint.check_complete`), else None."""
    from framework.checkpoint import check_complete

    steps = _override_value(args, "trainer.max_steps")
    if steps is None or not steps.isdigit():
        return None
    d = Path(run_dir) / "checkpoints" / f"step-{int(steps):06d}"
    return d if d.is_dir() and check_complete(d) is None else None


def has_complete_checkpoint(run_dir: Path) -> bool:
    from framework.checkpoint import check_complete

    root = Path(run_dir) / "checkpoints"
    return root.is_dir() and any(
        d.is_dir() and d.name.startswith("step-") and "." not in d.name and check_complete(d) is None
        for d in root.iterdir()
    )


def finished_by_checkpoint(run: Run, s: dict, args: list[str]) -> dict | None:
    """The run's summary when its final checkpoint is complete and its metrics read (it finished
    its training, whatever its exit status), else None."""
    from benchmarks.report import summarize_run

    if final_checkpoint(run.run_dir, args) is None:
        return None
    ev = s.get("eval") or {}
    try:
        return summarize_run(run.run_dir, metric=ev.get("metric", "eval/accuracy"), threshold=ev.get("threshold"))
    except Exception:  # noqa: BLE001 - no readable metrics: not finished
        return None


@dataclass
class Decision:
    """What the sweep does with a run folder: ``run`` (new), ``skip`` (finished with this
    command), ``complete`` (its final checkpoint is complete: recorded as done without running),
    ``resume`` (interrupted), ``retry`` (failed before), ``keep_failed`` (``rerun_failed=false``),
    ``refuse`` (finished with another command), ``replace`` (the same, with ``replace=true``),
    ``broken`` (its final checkpoint is complete but its metrics unreadable: kept, not rerun)."""

    action: str
    why: str = ""
    recorded: dict | None = None  # the marker it read (DONE / FAILED / INTERRUPTED / STARTED .json)


def decide(run: Run, s: dict, *, rerun_failed: bool = True, replace: bool = False) -> Decision:
    """What to do with ``run`` given what its folder holds (reads only; see :class:`Decision`)."""
    args = run_args(run)
    d = run.run_dir
    done = _read_json(d / DONE)
    if done is not None:
        if done.get("command") == args:
            return Decision("skip", "finished before", done)
        diff = command_difference(done.get("command") or [], args)
        return Decision("replace" if replace else "refuse", diff, done)
    # no DONE.json: the command it was started with, from whichever marker it left
    recorded = next(
        (m for m in (_read_json(d / name) for name in (INTERRUPTED, FAILED, STARTED)) if m is not None), None
    )
    old = recorded.get("command") if recorded else None
    if final_checkpoint(d, old or args) is not None:  # it trained to its end: a finished run, never deleted
        if old != args:
            why = command_difference(old, args) if old is not None else "its command is unknown: no DONE.json"
            return Decision("replace" if replace else "refuse", why, recorded)
        if finished_by_checkpoint(run, s, args) is not None:
            return Decision("complete", "its final checkpoint is complete", recorded)
        if replace:
            return Decision("replace", "its metrics cannot be read", recorded)
        return Decision("broken", "its final checkpoint is complete but its metrics cannot be read", recorded)
    if old == args and recorded is not None and recorded.get("status") in ("interrupted", "started"):
        # interrupted (or the sweep itself was killed while it ran): resume it from its newest checkpoint
        if has_complete_checkpoint(d):
            return Decision("resume", "interrupted before", recorded)
        return Decision("run", "interrupted before its first checkpoint: starting over", recorded)
    failed = _read_json(d / FAILED)
    if failed is not None and failed.get("command") == args:
        if not rerun_failed:
            return Decision("keep_failed", "failed before (rerun_failed=false)", failed)
        return Decision("retry", "failed before", failed)
    if d.exists() and any(d.iterdir()):
        return Decision("run", "an unfinished earlier attempt: starting over", recorded)
    return Decision("run")


DECISION_TEXT = {
    "run": "would run",
    "skip": "would skip (finished before)",
    "complete": "would record as done (its final checkpoint is complete)",
    "resume": "would resume from its last checkpoint",
    "retry": "would run again (failed before)",
    "keep_failed": "would keep as failed (rerun_failed=false)",
    "refuse": "REFUSED: finished with another command",
    "replace": "would run again with the new command (replace=true; the finished folder is kept renamed)",
    "broken": "would keep as failed (its final checkpoint is complete but its metrics cannot be read)",
}


def refused_summary(refused: list[tuple[Run, Decision]]) -> str:
    """One line: which finished runs the sweep would have to replace, what differs, what to do."""
    by_diff: dict[str, list[str]] = {}
    for r, dec in refused:
        by_diff.setdefault(dec.why, []).append(r.name)
    what = "; ".join(f"{', '.join(names)} ({diff})" for diff, names in by_diff.items())
    return (
        f"{len(refused)} finished run(s) were run with other settings than this sweep gives them: {what}; "
        "nothing was started and nothing deleted: run this sweep into another sweep_dir=..., or give replace=true "
        "to run them again (each finished folder is kept, renamed seed<k>.replaced-<time>)"
    )


def _move_aside(d: Path) -> Path:
    """Rename a finished run folder out of the sweep's way (never delete it)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    dest = d.with_name(f"{d.name}.replaced-{stamp}")
    i = 1
    while dest.exists():
        dest = d.with_name(f"{d.name}.replaced-{stamp}-{i}")
        i += 1
    d.rename(dest)
    return dest


def _record_done(run: Run, args: list[str], note: str | None = None) -> None:
    run.status = "done"
    _write_json(
        run.run_dir / DONE,
        {
            "status": "done",
            "task": run.task,
            "algorithm": run.algorithm,
            "seed": run.seed,
            "wall_s": round(run.wall_s, 1),
            "cpu_s": round(run.cpu_s, 1),
            "summary": run.summary,
            "command": args,
            **({"note": note} if note else {}),
        },
    )
    for name in (FAILED, INTERRUPTED):  # the run is finished: an earlier attempt's marker no longer holds
        (run.run_dir / name).unlink(missing_ok=True)


def _record_interrupted(run: Run, args: list[str], rc: int | None, error: str) -> None:
    run.status, run.error = "interrupted", error
    _write_json(
        run.run_dir / INTERRUPTED,
        {"status": "interrupted", "returncode": rc, "error": error, "command": args, "log": str(run.run_dir / LOG)},
    )


def exit_description(rc: int) -> str | None:
    """``"killed by SIGSEGV"`` for a process a signal ended (a negative status), else None."""
    if rc < 0:
        return f"killed by {_signal_name(-rc)}"
    return None


def _settled_without_running(run: Run, dec, s: dict, args: list[str], note) -> bool:
    """Record the decisions that start no process (skip, refuse, keep failed, broken, complete)
    on ``run``; False when the run must be started (run, resume, replace, retry)."""
    if dec.action == "skip":
        done = dec.recorded or {}
        run.status, run.summary, run.wall_s = "skipped", done.get("summary", {}), done.get("wall_s", 0.0)
        run.cpu_s = done.get("cpu_s", 0.0)
    elif dec.action == "refuse":  # run_suite refuses the whole sweep before this; never delete a result
        run.status, run.error = "failed", f"finished before with another command ({dec.why}); not replaced"
    elif dec.action == "keep_failed":
        run.status, run.error = "failed", (dec.recorded or {}).get("error")
    elif dec.action == "broken":  # never deleted: its checkpoint is a result; replace=true moves it aside
        run.status, run.error = "failed", f"{dec.why} (replace=true runs it again, keeping this folder renamed)"
    elif dec.action == "complete":
        run.summary = finished_by_checkpoint(run, s, args) or {}
        _record_done(run, args, note="recorded as done from its complete final checkpoint")
        note("its final checkpoint is complete: recorded as done")
    else:
        return False
    return True


def execute(run: Run, s: dict, *, rerun_failed: bool, print_lock: threading.Lock, replace: bool = False) -> Run:
    from benchmarks.report import summarize_run

    def note(msg: str) -> None:  # (not `say`: that is the module's printer it calls)
        with print_lock:
            say(f"  {run.name}: {msg}")

    args = run_args(run)
    dec = decide(run, s, rerun_failed=rerun_failed, replace=replace)
    if _settled_without_running(run, dec, s, args, note):
        return run
    command = run.command
    if dec.action == "resume":  # continue it from its newest complete checkpoint, into the same folder
        (run.run_dir / INTERRUPTED).unlink(missing_ok=True)  # (a sweep killed while it ran left STARTED.json)
        command = [*run.command, f"resume={run.run_dir}"]
        note("interrupted before; resuming it from its last checkpoint")
    else:
        if dec.action == "replace" and run.run_dir.exists():
            dest = _move_aside(run.run_dir)
            note(f"finished before with another command ({dec.why}); the finished run is kept as {dest}")
        elif run.run_dir.exists():  # a failed or unfinished attempt (never a finished one: see decide)
            shutil.rmtree(run.run_dir)
        run.run_dir.mkdir(parents=True)
    _write_json(run.run_dir / STARTED, {"status": "started", "command": args, "time": time.time()})
    t0 = time.perf_counter()
    timeout = s.get("timeout_s")
    rc: int | None = None
    with open(run.run_dir / LOG, "a" if command is not run.command else "w", encoding="utf-8") as log:
        log.write("$ " + " ".join(command) + "\n")
        log.flush()
        if _STOP.is_set():  # stopped while this one was being prepared
            run.status, run.error = "interrupted", f"not started: {stop_reason()}"
            return run
        proc = subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: a terminal's Ctrl-C reaches it only through us
            env={
                **without_wandb_service(dict(os.environ)),  # each run its own W&B service: see the function
                "PYTHONUNBUFFERED": "1",
                **{str(k): str(v) for k, v in (s.get("env") or {}).items()},
            },
        )
        _RUNNING.add(proc)
        if _STOP.is_set() and _STOPPED_BY:  # a signal arrived between the check above and now
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(getattr(signal, _STOPPED_BY[0], signal.SIGINT))
        timed_out = threading.Event()

        def kill():
            timed_out.set()
            proc.kill()

        timer = threading.Timer(float(timeout), kill) if timeout else None
        if timer:
            timer.start()
        try:  # wait4: the exit status and the CPU time of the run (its worker processes included)
            _, status, usage = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(status)
            run.cpu_s = usage.ru_utime + usage.ru_stime
        finally:
            _RUNNING.discard(proc)
            if timer:
                timer.cancel()
        rc = None if timed_out.is_set() else proc.returncode
    run.wall_s = time.perf_counter() - t0
    (run.run_dir / STARTED).unlink(missing_ok=True)
    text = (run.run_dir / LOG).read_text(encoding="utf-8", errors="replace")
    ev = s.get("eval") or {}
    unreadable = None  # exit status 0 without readable metrics: failed
    if rc == 0:
        try:
            run.summary = summarize_run(
                run.run_dir, metric=ev.get("metric", "eval/accuracy"), threshold=ev.get("threshold")
            )
        except Exception as e:  # noqa: BLE001 - a run without metrics counts as failed
            unreadable = f"the run finished but its metrics could not be read: {e}"
    elif (summary := finished_by_checkpoint(run, s, args)) is not None:
        # preempted during its final step, or signalled during the teardown after its final
        # checkpoint: it trained to its end, and its final checkpoint and metrics are there
        run.summary = summary
        _record_done(run, args, note=f"exit status {rc} after its complete final checkpoint")
        note(f"exit status {rc}, but its final checkpoint is complete: recorded as done")
        return run
    if rc == 0 and unreadable is None:
        _record_done(run, args)
    elif rc and (rc in (EXIT_PREEMPTED, EXIT_SIGINT) or _STOP.is_set()):
        # preempted or interrupted (it wrote a checkpoint of its last step): the next sweep resumes it
        if _STOP.is_set():
            killed = exit_description(rc)
            why = f"interrupted by {stop_reason()}" + (f" ({killed})" if killed else "")
        elif rc == EXIT_SIGINT:
            why = "interrupted by SIGINT (exit status 130)"
        else:  # 75: its own line, "apo-rl: preempted by SIGTERM after RL step k: checkpoint ..."
            said = [ln.strip() for ln in text.splitlines()[1:] if "preempted" in ln]
            why = said[-1][:400] if said else f"preempted (exit status {rc})"
        _record_interrupted(run, args, rc, why)
    else:
        run.status = "failed"
        if rc is None:
            run.error = f"timed out after {timeout} s"
        else:
            run.error = unreadable or exit_description(rc) or error_message(text)
        _write_json(
            run.run_dir / FAILED,
            {
                "status": "failed",
                "task": run.task,
                "algorithm": run.algorithm,
                "seed": run.seed,
                "returncode": rc,
                "error": run.error,
                "log": str(run.run_dir / LOG),
                "wall_s": round(run.wall_s, 1),
                "command": args,
            },
        )
    return run


def compose_run_config(overrides: list[str]) -> DictConfig:
    """A run's config as ``apo-rl <overrides>`` composes it."""
    return compose_config(overrides)


def preflight(runs: list[Run]) -> dict[str, list[str]]:
    """Check every run before any starts: the names (algorithms, config groups, keys of the
    tasks' and algorithms' overrides) by composing each run's config, and its values, registered
    names and reward parameters by :func:`framework.train.check_early` (which runs
    :func:`framework.config.validate_run_config`; no model is loaded). Returns
    ``{problem: [run names]}``; empty when every run can start."""
    from framework.train import check_early

    problems: dict[str, list[str]] = {}
    for r in runs:
        try:
            early = check_early(compose_run_config(r.command[3:]))
            early["rewards"].close()
        except Exception as e:  # noqa: BLE001 - every problem of every run is collected
            problems.setdefault(exception_message(e), []).append(r.name)
    return problems


def problem_summary(problems: dict[str, list[str]], n_runs: int) -> str:
    """``"2 of 6 runs cannot start: count/x/seed0, count/x/seed1: <problem>; ..."``, one line."""
    bad = {name for names in problems.values() for name in names}
    return f"{len(bad)} of {n_runs} runs cannot start: " + "; ".join(
        f"{', '.join(names)}: {msg}" for msg, names in problems.items()
    )


def command_text(run: Run) -> str:
    """The run's command as a user would type it: ``python -m framework.run <overrides>``."""
    return shlex.join([sys.executable, "-m", "framework.run", *run_args(run)])


def run_all(runs: list[Run], s: dict, *, rerun_failed: bool = True, replace: bool = False) -> None:
    """Execute ``runs`` (``suite.jobs`` at a time), printing one progress line per run; a
    SIGINT / SIGTERM / SIGUSR1 is passed on to the running runs and no further run starts."""
    lock = threading.Lock()
    counter = iter(range(1, len(runs) + 1))
    metric = (s.get("eval") or {}).get("metric", "eval/accuracy")

    def one(r: Run) -> Run:
        if _STOP.is_set():  # the next sweep runs it
            r.status, r.error = "interrupted", f"not started: {stop_reason()}"
            return r
        execute(r, s, rerun_failed=rerun_failed, print_lock=lock, replace=replace)
        with lock:
            i = next(counter)
            if r.status == "failed":
                msg = f"FAILED ({r.error}); its output: {r.run_dir / LOG}"
            elif r.status == "interrupted":
                msg = f"INTERRUPTED ({r.error}); the next run of this sweep resumes it"
            else:
                fin = r.summary.get("final", {}).get(metric)
                msg = (
                    f"{'skipped (finished before)' if r.status == 'skipped' else 'done'} in {r.wall_s:.0f} s "
                    f"(CPU {r.cpu_s:.0f} s)" + (f", final {metric} {fin:.3f}" if isinstance(fin, (int, float)) else "")
                )
            say(f"[{i}/{len(runs)}] {r.name}: {msg}")
        return r

    jobs = max(1, int(s.get("jobs") or 1))
    with stop_signals_forwarded():
        if jobs == 1:
            for r in runs:
                one(r)
        else:
            with ThreadPoolExecutor(max_workers=jobs) as pool:
                list(pool.map(one, runs))


@contextlib.contextmanager
def _quiet_start_up_checks():
    """The pre-flight check composes and checks every run: its informational lines (each run's
    "recipe differs" line, once per run) belong to the runs' own logs, not the sweep's console."""
    import logging

    from framework.run import LOGGERS

    loggers = [logging.getLogger(n) for n in LOGGERS if n != "benchmarks"]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(max(lg.level, logging.WARNING))
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def run_suite(cfg: DictConfig) -> list[Run]:
    s = suite_dict(cfg)
    sweep_dir = Path(str(cfg.sweep_dir)).expanduser().resolve()  # relative to the current directory
    runs = plan(s, sweep_dir)
    with _quiet_start_up_checks():
        problems = preflight(runs)
    replace, rerun_failed = bool(cfg.get("replace", False)), bool(cfg.get("rerun_failed", True))
    decisions = [(r, decide(r, s, rerun_failed=rerun_failed, replace=replace)) for r in runs]
    refused = [(r, d) for r, d in decisions if d.action == "refuse"]
    if cfg.get("dry_run"):
        if problems:
            print(f"benchmarks.run: warning: {problem_summary(problems, len(runs))}", flush=True)
        if refused:
            print(f"benchmarks.run: warning: {refused_summary(refused)}", flush=True)
        for i, (r, d) in enumerate(decisions, 1):
            why = f" ({d.why})" if d.why and d.action in ("refuse", "replace", "run") else ""
            print(f"[{i}/{len(runs)}] {r.name}: {DECISION_TEXT[d.action]}{why}")
            print(f"  {command_text(r)}")
        return runs
    if problems:
        raise ConfigError(f"suite '{s['name']}': {problem_summary(problems, len(runs))}; no run was started")
    if refused:
        raise ConfigError(f"suite '{s['name']}': {refused_summary(refused)}")
    sweep_dir.mkdir(parents=True, exist_ok=True)
    (sweep_dir / SUITE_FILE).write_text(OmegaConf.to_yaml(OmegaConf.create(s)))
    _CONSOLE_FILE[:] = [sweep_dir / CONSOLE]
    _append_console(f"$ {shlex.join(sys.argv)}  # {time.strftime('%Y-%m-%d %H:%M:%S')}")
    say(
        f"benchmarks.run: suite '{s['name']}': {len(runs)} runs "
        f"({len(s['tasks'])} task(s) x {len(s['algorithms'])} algorithm(s) x {len(s['seeds'])} seed(s)) "
        f"-> {sweep_dir}"
    )
    t0 = time.perf_counter()
    jobs = max(1, int(s.get("jobs") or 1))
    run_all(runs, s, rerun_failed=rerun_failed, replace=replace)
    n = {k: sum(r.status == k for r in runs) for k in ("done", "skipped", "failed", "interrupted")}
    say(
        f"benchmarks.run: {n['done']} done, {n['skipped']} skipped (finished before), {n['failed']} failed, "
        f"{n['interrupted']} interrupted "
        f"in {time.perf_counter() - t0:.0f} s"
    )
    (sweep_dir / "sweep_status.json").write_text(
        json.dumps(
            {
                "wall_s": round(time.perf_counter() - t0, 1),
                "jobs": jobs,
                **n,
                "stopped_by": _STOPPED_BY[0] if _STOPPED_BY else None,
                "runs": [
                    {
                        "run": r.name,
                        "status": r.status,
                        "error": r.error,
                        "log": str(r.run_dir / LOG) if r.status == "failed" else None,
                        "wall_s": round(r.wall_s, 1),
                        "cpu_s": round(r.cpu_s, 1),
                    }
                    for r in runs
                ],
            },
            indent=2,
        )
    )
    if _STOP.is_set():
        say(
            f"benchmarks.run: stopped by {stop_reason()}: {n['interrupted']} run(s) recorded as interrupted; "
            "run the same command again to resume them (the report is written when the sweep ends)"
        )
    elif cfg.get("report", True):
        from benchmarks.report import write_report

        path = write_report(sweep_dir)
        say(f"benchmarks.run: report -> {path}")
    return runs


@hydra.main(config_path=HYDRA_CONFIG_PATH, config_name="benchmark", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from framework.run import setup_console_logging, user_errors

    setup_console_logging()
    try:
        with user_errors():  # a UserError: one `error:` line, exit status 2
            runs = run_suite(cfg)
    except KeyboardInterrupt:  # Ctrl-C before any run started (while checking the configs)
        print("benchmarks.run: interrupted (Ctrl-C) before any run started", file=sys.stderr, flush=True)
        sys.exit(EXIT_SIGINT)
    if _STOPPED_BY and _STOPPED_BY[0] == "SIGINT":
        sys.exit(EXIT_SIGINT)  # Ctrl-C: 130, as a shell reports it
    if any(r.status == "failed" for r in runs):
        sys.exit(1)
    if any(r.status == "interrupted" for r in runs):
        sys.exit(EXIT_PREEMPTED)  # the sweep itself was preempted: requeue it, it resumes its runs


HELP = """\
apo-rl-sweep: run a benchmark suite (configs/suite/<name>.yaml): every task x algorithm x seed
as its own apo-rl run in <sweep_dir>/<task>/<algorithm>/seed<k>/, then <sweep_dir>/report.md
and plots. Re-running the same command skips finished runs, resumes interrupted ones and
retries failed ones; a finished run is never deleted (changed settings: another sweep_dir=,
or replace=true, which keeps the old folder renamed).

  apo-rl-sweep suite=smoke                                  GRPO / GRPO-D / APO x 2 seeds, tiny model, CPU
  apo-rl-sweep suite=smoke suite.steps=5 'suite.seeds=[0]'  a shorter grid
  apo-rl-sweep suite=smoke dry_run=true                     what would run, be skipped, resumed or refused
  apo-rl-sweep suite=baselines sweep_dir=outputs/sweeps/b   GRPO, GSPO, RLOO, GRPO-D, APO
  apo-rl-sweep suite=smoke replace=true                     rerun finished runs whose settings changed
Ctrl-C stops the running runs at a checkpoint (exit 130); the same command resumes them."""


def cli() -> None:
    """The ``apo-rl-sweep`` command (``python -m benchmarks.run`` runs the same)."""
    from framework.run import run_cli

    run_cli(main, config_name="benchmark", prog="apo-rl-sweep", about=HELP)


if __name__ == "__main__":
    cli()
