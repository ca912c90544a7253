"""Run a benchmark suite: ``python -m benchmarks.run suite=<name> [suite.steps=5 suite.seeds=[0]]``.

A suite (configs/suite/<name>.yaml) fixes the grid (``algorithms`` x ``seeds`` x ``tasks``), the
budget (``steps``), the evaluation (``eval``) and the overrides every run gets. Each
combination runs as its own ``python -m framework.run`` process (a crash or a bad config
fails that run only) in ``<sweep_dir>/<task>/<algorithm>/seed<k>/``, logging to W&B (offline
by default) in one group per sweep with the algorithm and seed in its config.

* A finished run leaves ``DONE.json`` (its final metrics); re-running the same sweep skips it
  (unless its command changed: then it runs again).
* A failed run leaves ``FAILED.json`` (return code and error message); the sweep goes on, and
  the next sweep retries it (``rerun_failed=false`` keeps it as failed).
* At the end ``<sweep_dir>/report.md`` and ``<sweep_dir>/plots/*.png`` are written and logged to
  W&B (benchmarks/report.py; ``python -m benchmarks.report <sweep_dir>`` regenerates them).

The exit status is 1 when a run failed. ``suite.jobs=N`` runs N processes at a time
(``suite.env`` sets environment variables for them, e.g. ``OMP_NUM_THREADS``); for a cluster use Hydra's launchers on ``python -m framework.run -m ...`` (see README, "Benchmark
suites").
"""

from __future__ import annotations

import json
import os
import shutil
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

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = str(ROOT / "configs")
DONE, FAILED, LOG = "DONE.json", "FAILED.json", "console.log"
SUITE_FILE = "suite.yaml"


@dataclass
class Run:
    task: str
    algorithm: str
    seed: int
    run_dir: Path
    command: list[str]
    status: str = "pending"  # pending | done | skipped | failed
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
                runs.append(Run(task, algo, int(seed), run_dir, [sys.executable, "-m", "framework.run", *overrides]))
    return runs


def error_message(log_text: str, limit: int = 400) -> str:
    """The user-facing error of a failed run from its console output."""
    lines = [ln.strip() for ln in log_text.splitlines() if ln.strip()]
    for ln in reversed(lines):
        if ln.startswith("error: "):
            return ln[len("error: ") :][:limit]
    lines = [
        ln for ln in lines if not ln.startswith(("Set the environment variable HYDRA_FULL_ERROR", "(set APO_RL_DEBUG"))
    ]
    for i in range(len(lines) - 1, -1, -1):  # the last exception line of a traceback
        head = lines[i].split(":", 1)[0]
        if head.endswith(("Error", "Exception", "Interrupt")) and " " not in head:
            return lines[i][:limit]
    return " / ".join(lines[-3:])[:limit] or "no output"


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
    if run.run_dir.exists():  # a previous attempt (failed or interrupted): start clean
        shutil.rmtree(run.run_dir)
    run.run_dir.mkdir(parents=True)
    t0 = time.perf_counter()
    timeout = s.get("timeout_s")
    rc: int | None = None
    with open(run.run_dir / LOG, "w", encoding="utf-8") as log:
        log.write("$ " + " ".join(run.command) + "\n")
        log.flush()
        proc = subprocess.Popen(
            run.command,
            cwd=str(ROOT),
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **{str(k): str(v) for k, v in (s.get("env") or {}).items()}},
        )
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
                    "wall_s": round(run.wall_s, 1),
                    "command": cmd_args,
                },
                indent=2,
            )
        )
    return run


def run_suite(cfg: DictConfig) -> list[Run]:
    s = suite_dict(cfg)
    sweep_dir = Path(str(cfg.sweep_dir)).expanduser().resolve()  # relative to the current directory
    sweep_dir.mkdir(parents=True, exist_ok=True)
    runs = plan(s, sweep_dir)
    if cfg.get("dry_run"):
        for r in runs:
            print(" ".join(r.command))
        return runs
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
        execute(r, s, rerun_failed=bool(cfg.get("rerun_failed", True)), print_lock=lock)
        with lock:
            i = next(counter)
            if r.status == "failed":
                msg = f"FAILED ({r.error})"
            else:
                fin = r.summary.get("final", {}).get(metric)
                msg = (
                    f"{'skipped (finished before)' if r.status == 'skipped' else 'done'} in {r.wall_s:.0f} s "
                    f"(CPU {r.cpu_s:.0f} s)" + (f", final {metric} {fin:.3f}" if isinstance(fin, (int, float)) else "")
                )
            print(f"[{i}/{len(runs)}] {r.name}: {msg}", flush=True)
        return r

    t0 = time.perf_counter()
    jobs = max(1, int(s.get("jobs") or 1))
    if jobs == 1:
        for r in runs:
            one(r)
    else:
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            list(pool.map(one, runs))
    n = {k: sum(r.status == k for r in runs) for k in ("done", "skipped", "failed")}
    print(
        f"benchmarks.run: {n['done']} done, {n['skipped']} skipped (finished before), {n['failed']} failed "
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


@hydra.main(config_path=CONFIG_DIR, config_name="benchmark", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from framework.run import setup_console_logging, user_errors

    setup_console_logging()
    with user_errors():  # a UserError: one `error:` line, exit status 2
        runs = run_suite(cfg)
    if any(r.status == "failed" for r in runs):
        sys.exit(1)


if __name__ == "__main__":
    main()
