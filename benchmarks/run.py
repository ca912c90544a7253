"""Run a benchmark suite: ``python -m benchmarks.run suite=<name> [suite.steps=5 suite.seeds=[0]]``.

A suite (configs/suite/<name>.yaml) fixes the grid (``algorithms`` x ``seeds`` x ``tasks``), the
budget (``steps``), the evaluation (``eval``) and the overrides every run gets. Each
combination runs as its own ``python -m framework.run`` process (a crash or a bad config
fails that run only) in ``<sweep_dir>/<task>/<algorithm>/seed<k>/``, logging to W&B (offline
by default) in one group per sweep with the algorithm and seed in its config.

* A finished run leaves ``DONE.json`` (its final metrics); re-running the same sweep skips it
  (unless its command changed: then it runs again).
* Before any run starts, every run's config is composed (Hydra's compose API on configs/, the
  run's overrides) and checked by :func:`framework.train.check_early` (values, registered
  names, reward parameters; no model loads): a mistyped algorithm, group option or key fails
  the sweep at once, listing every run it affects, and nothing runs (``dry_run=true`` prints
  the problems as a warning).
* A failed run leaves ``FAILED.json``: its return code, its own error (the ``error: ...`` line
  the CLI printed, or the exception line of its traceback; see :func:`error_message`) and the
  path of its ``console.log`` (the full output); the sweep goes on, and the next sweep retries
  it (``rerun_failed=false`` keeps it as failed).
* At the end ``<sweep_dir>/report.md`` and ``<sweep_dir>/plots/`` (PNG + PDF + the plotted data
  as CSV) are written and logged to W&B (benchmarks/report.py; ``python -m benchmarks.report
  <sweep_dir>`` regenerates them).

The exit status is 1 when a run failed. ``suite.jobs=N`` runs N processes at a time
(``suite.env`` sets environment variables for them, e.g. ``OMP_NUM_THREADS``); for a cluster use Hydra's launchers on ``python -m framework.run -m ...`` (see README, "Benchmark
suites").
"""

from __future__ import annotations

import contextlib
import json
import os
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


# a SIGTERM / SIGUSR1 to the sweep (preemption) is passed on to the running runs, which write a
# checkpoint and exit as interrupted; runs not started yet are left for the next sweep
_STOP = threading.Event()
_RUNNING: set[subprocess.Popen] = set()


def _on_preemption(signum, frame) -> None:
    _STOP.set()
    for proc in list(_RUNNING):
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signum)


def _read_json(p: Path) -> dict | None:
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return None


def execute(run: Run, s: dict, *, rerun_failed: bool, print_lock: threading.Lock) -> Run:
    from benchmarks.report import summarize_run

    done = _read_json(run.run_dir / DONE)
    cmd_args = run.command[3:]
    if done is not None:
        if done.get("command") == cmd_args:
            run.status, run.summary, run.wall_s = "skipped", done.get("summary", {}), done.get("wall_s", 0.0)
            run.cpu_s = done.get("cpu_s", 0.0)
            return run
        with print_lock:
            print(f"  {run.name}: its command changed since it finished; running it again", flush=True)
    failed = _read_json(run.run_dir / FAILED)
    if failed is not None and not rerun_failed and failed.get("command") == cmd_args:
        run.status, run.error = "failed", failed.get("error")
        return run
    interrupted = _read_json(run.run_dir / INTERRUPTED)
    command = run.command
    if interrupted is not None and interrupted.get("command") == cmd_args:
        # preempted before: continue it from its newest complete checkpoint, into the same folder
        (run.run_dir / INTERRUPTED).unlink()
        command = [*run.command, f"resume={run.run_dir}"]
        with print_lock:
            print(f"  {run.name}: interrupted before; resuming it from its last checkpoint", flush=True)
    else:
        if run.run_dir.exists():  # a previous attempt (failed, or another command): start clean
            shutil.rmtree(run.run_dir)
        run.run_dir.mkdir(parents=True)
    t0 = time.perf_counter()
    timeout = s.get("timeout_s")
    rc: int | None = None
    with open(run.run_dir / LOG, "a" if command is not run.command else "w", encoding="utf-8") as log:
        log.write("$ " + " ".join(command) + "\n")
        log.flush()
        proc = subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={
                **without_wandb_service(dict(os.environ)),  # each run its own W&B service: see the function
                "PYTHONUNBUFFERED": "1",
                **{str(k): str(v) for k, v in (s.get("env") or {}).items()},
            },
        )
        _RUNNING.add(proc)
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
    text = (run.run_dir / LOG).read_text(encoding="utf-8", errors="replace")
    ev = s.get("eval") or {}
    if rc == 0:
        try:
            run.summary = summarize_run(
                run.run_dir, metric=ev.get("metric", "eval/accuracy"), threshold=ev.get("threshold")
            )
        except Exception as e:  # noqa: BLE001 - a run without metrics counts as failed
            rc, text = -1, f"error: the run finished but its metrics could not be read: {e}"
    if rc == 0:
        run.status = "done"
        (run.run_dir / DONE).write_text(
            json.dumps(
                {
                    "status": "done",
                    "task": run.task,
                    "algorithm": run.algorithm,
                    "seed": run.seed,
                    "wall_s": round(run.wall_s, 1),
                    "cpu_s": round(run.cpu_s, 1),
                    "summary": run.summary,
                    "command": cmd_args,
                },
                indent=2,
            )
        )
    elif rc == EXIT_PREEMPTED:  # SIGTERM / SIGUSR1: it wrote a checkpoint; the next sweep resumes it
        run.status, run.error = "interrupted", error_message(text)
        (run.run_dir / INTERRUPTED).write_text(
            json.dumps({"status": "interrupted", "returncode": rc, "error": run.error, "command": cmd_args}, indent=2)
        )
    else:
        run.status = "failed"
        run.error = f"timed out after {timeout} s" if rc is None else error_message(text)
        (run.run_dir / FAILED).write_text(
            json.dumps(
                {
                    "status": "failed",
                    "task": run.task,
                    "algorithm": run.algorithm,
                    "seed": run.seed,
                    "returncode": rc,
                    "error": run.error,
                    "log": str(run.run_dir / LOG),
                    "wall_s": round(run.wall_s, 1),
                    "command": cmd_args,
                },
                indent=2,
            )
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


def run_suite(cfg: DictConfig) -> list[Run]:
    s = suite_dict(cfg)
    sweep_dir = Path(str(cfg.sweep_dir)).expanduser().resolve()  # relative to the current directory
    sweep_dir.mkdir(parents=True, exist_ok=True)
    runs = plan(s, sweep_dir)
    problems = preflight(runs)
    if cfg.get("dry_run"):
        if problems:
            print(f"benchmarks.run: warning: {problem_summary(problems, len(runs))}", flush=True)
        for r in runs:
            print(" ".join(r.command))
        return runs
    if problems:
        raise ConfigError(f"suite '{s['name']}': {problem_summary(problems, len(runs))}; no run was started")
    (sweep_dir / SUITE_FILE).write_text(OmegaConf.to_yaml(OmegaConf.create(s)))
    print(
        f"benchmarks.run: suite '{s['name']}': {len(runs)} runs "
        f"({len(s['tasks'])} task(s) x {len(s['algorithms'])} algorithm(s) x {len(s['seeds'])} seed(s)) "
        f"-> {sweep_dir}",
        flush=True,
    )
    lock = threading.Lock()
    counter = iter(range(1, len(runs) + 1))
    metric = (s.get("eval") or {}).get("metric", "eval/accuracy")

    def one(r: Run) -> Run:
        if _STOP.is_set():  # preempted: the next sweep runs it
            r.status, r.error = "interrupted", "the sweep was preempted before it started"
            return r
        execute(r, s, rerun_failed=bool(cfg.get("rerun_failed", True)), print_lock=lock)
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
            print(f"[{i}/{len(runs)}] {r.name}: {msg}", flush=True)
        return r

    t0 = time.perf_counter()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, _on_preemption)
    jobs = max(1, int(s.get("jobs") or 1))
    if jobs == 1:
        for r in runs:
            one(r)
    else:
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            list(pool.map(one, runs))
    n = {k: sum(r.status == k for r in runs) for k in ("done", "skipped", "failed", "interrupted")}
    print(
        f"benchmarks.run: {n['done']} done, {n['skipped']} skipped (finished before), {n['failed']} failed, "
        f"{n['interrupted']} interrupted "
        f"in {time.perf_counter() - t0:.0f} s",
        flush=True,
    )
    (sweep_dir / "sweep_status.json").write_text(
        json.dumps(
            {
                "wall_s": round(time.perf_counter() - t0, 1),
                "jobs": jobs,
                **n,
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
    if cfg.get("report", True):
        from benchmarks.report import write_report

        path = write_report(sweep_dir)
        print(f"benchmarks.run: report -> {path}", flush=True)
    return runs


@hydra.main(config_path=HYDRA_CONFIG_PATH, config_name="benchmark", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from framework.run import setup_console_logging, user_errors

    setup_console_logging()
    with user_errors():  # a UserError: one `error:` line, exit status 2
        runs = run_suite(cfg)
    if any(r.status == "failed" for r in runs):
        sys.exit(1)
    if any(r.status == "interrupted" for r in runs):
        sys.exit(EXIT_PREEMPTED)  # the sweep itself was preempted: requeue it, it resumes its runs


if __name__ == "__main__":
    main()
