"""Report of a benchmark sweep: ``python -m benchmarks.report <sweep_dir>``.

Reads every run of ``<sweep_dir>/<task>/<algorithm>/seed<k>/`` (``csv/metrics.csv``,
``DONE.json`` / ``FAILED.json``) and the sweep's ``suite.yaml``, and writes

* ``<sweep_dir>/report.md``: per task, a table with mean ± std over seeds per algorithm of
  the final and best held-out accuracy (``suite.eval.metric``), the final greedy accuracy,
  the first evaluation step reaching ``suite.eval.threshold``, the response length and the KL
  (means over the last 10% of the training steps); failed runs with their errors;
* ``<sweep_dir>/plots/<task>_<metric>.png``: accuracy, reward, KL / beta, entropy and
  response length against the RL step, one line per algorithm (mean over seeds) with a
  band (± one std over seeds);
* a W&B run (offline by default) in the sweep's group with the tables (``wandb.Table``) and
  the plots (``wandb.Image``).

Metrics come from Lightning's CSV log: training rows are keyed by ``rl_step`` (1..N), held-out
evaluations by ``eval/step`` (the RL step they were made at: 0, every N, the last).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import statistics
import sys
from pathlib import Path
from typing import Any

from framework.errors import DataError

log = logging.getLogger("benchmarks.report")  # not __name__: that is "__main__" under python -m

DONE, FAILED = "DONE.json", "FAILED.json"
TRAIN_KEYS = ("reward", "accuracy", "kl", "beta", "entropy", "completions/mean_length")
PLOTS = (  # file stem, title, [(metric, source, panel label)]
    ("accuracy", "held-out accuracy", [("{metric}", "eval", None)]),
    ("reward", "training reward (batch mean)", [("reward", "train", None)]),
    (
        "kl_beta",
        "KL to the reference and KL weight",
        [("kl", "train", "KL (per token)"), ("beta/effective|beta", "train", "beta (APO: mean effective beta_i)")],
    ),
    ("entropy", "policy entropy on sampled tokens (nats)", [("entropy", "train", None)]),
    ("length", "response length (tokens, batch mean)", [("completions/mean_length", "train", None)]),
)
SMOOTH = 5  # rolling mean over this many RL steps for the training curves


# ----------------------------------------------------------------------------- one run
def _float(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(f) else f


def read_metrics(run_dir: Path) -> tuple[dict[int, dict], dict[int, dict]]:
    """``(train, evals)``: training metrics by RL step and held-out metrics by evaluation step."""
    path = Path(run_dir) / "csv" / "metrics.csv"
    if not path.exists():
        raise DataError(f"{path} does not exist")
    train: dict[int, dict] = {}
    evals: dict[int, dict] = {}
    with open(path, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            vals = {k: _float(v) for k, v in row.items() if k and v not in (None, "")}
            vals = {k: v for k, v in vals.items() if v is not None}
            if "reward" in vals and "rl_step" in vals:
                train[int(vals["rl_step"])] = vals
            if "eval/step" in vals:
                step = int(vals["eval/step"])
                evals.setdefault(step, {k: v for k, v in vals.items() if k.startswith("eval/")})
    return train, evals


def summarize_run(run_dir: Path, metric: str = "eval/accuracy", threshold: float | None = None) -> dict:
    """Final / best held-out metrics, first step reaching ``threshold`` and training averages."""
    train, evals = read_metrics(run_dir)
    if not evals:
        raise DataError(f"{run_dir}: no held-out evaluation in csv/metrics.csv (column eval/step)")
    steps = sorted(evals)
    series = [(s, evals[s].get(metric)) for s in steps if evals[s].get(metric) is not None]
    out: dict[str, Any] = {
        "metric": metric,
        "final": evals[steps[-1]],
        "initial": evals[steps[0]],
        "eval_steps": steps,
        "train_steps": len(train),
    }
    out["best"] = max((v for _, v in series), default=None)
    out["best_step"] = max(series, key=lambda sv: sv[1])[0] if series else None
    out["steps_to_threshold"] = (
        None if threshold is None else next((s for s, v in series if v >= float(threshold)), None)
    )
    out["threshold"] = threshold
    if train:
        ts = sorted(train)
        tail = ts[-max(1, len(ts) // 10) :]
        for k in TRAIN_KEYS:
            vals = [train[s][k] for s in tail if k in train[s]]
            if vals:
                out[f"last10pct/{k}"] = sum(vals) / len(vals)
    return out


# ----------------------------------------------------------------------------- the sweep
def _load_suite(sweep_dir: Path) -> dict:
    p = sweep_dir / "suite.yaml"
    if p.exists():
        from omegaconf import OmegaConf

        return OmegaConf.to_container(OmegaConf.load(p), resolve=True)
    return {}


def collect(sweep_dir: Path) -> tuple[dict, list[dict]]:
    """The suite and one entry per run directory (task, algorithm, seed, status, ...)."""
    sweep_dir = Path(sweep_dir)
    suite = _load_suite(sweep_dir)
    metric = (suite.get("eval") or {}).get("metric", "eval/accuracy")
    threshold = (suite.get("eval") or {}).get("threshold")
    expected = [
        (t, a, int(s))
        for t in (suite.get("tasks") or {})
        for a in suite.get("algorithms", [])
        for s in suite.get("seeds", [])
    ]
    found = [
        (p.parent.parent.name, p.parent.name, int(p.name[4:]))
        for p in sorted(sweep_dir.glob("*/*/seed*"))
        if p.is_dir() and p.name[4:].isdigit()
    ]
    keys = list(dict.fromkeys(expected + found))
    runs = []
    for task, algo, seed in keys:
        d = sweep_dir / task / algo / f"seed{seed}"
        entry: dict[str, Any] = {"task": task, "algorithm": algo, "seed": seed, "dir": d}
        failed = d / FAILED
        if (d / DONE).exists():
            try:
                info = json.loads((d / DONE).read_text())
                entry.update(wall_s=info.get("wall_s"), cpu_s=info.get("cpu_s"))
                entry.update(status="done", summary=summarize_run(d, metric, threshold))
                entry["train"], entry["evals"] = read_metrics(d)
            except Exception as e:  # noqa: BLE001
                entry.update(status="failed", error=f"metrics unreadable: {e}")
        elif failed.exists():
            info = json.loads(failed.read_text())
            entry.update(status="failed", error=info.get("error", "?"))
        else:
            entry.update(status="missing", error="not run (or still running)")
        runs.append(entry)
    return suite, runs


def _ms(vals: list[float], fmt: str = "{:.3f}") -> str:
    vals = [v for v in vals if v is not None]
    if not vals:
        return "—"
    if len(vals) == 1:
        return fmt.format(vals[0])
    return f"{fmt.format(statistics.mean(vals))} ± {fmt.format(statistics.stdev(vals))}"


def table_rows(runs: list[dict], algorithms: list[str], metric: str, threshold) -> list[list[str]]:
    rows = []
    for algo in algorithms:
        rs = [r for r in runs if r["algorithm"] == algo]
        ok = [r for r in rs if r["status"] == "done"]
        sm = [r["summary"] for r in ok]
        reached = [s["steps_to_threshold"] for s in sm if s.get("steps_to_threshold") is not None]
        if threshold is None or not ok:
            thr = "—"
        elif reached:
            thr = f"{_ms([float(x) for x in reached], '{:.0f}')} ({len(reached)}/{len(ok)})"
        else:
            thr = f"not reached (0/{len(ok)})"
        rows.append(
            [
                algo,
                f"{len(ok)}/{len(rs)}",
                _ms([s["initial"].get(metric) for s in sm]),
                _ms([s["final"].get(metric) for s in sm]),
                _ms([s.get("best") for s in sm]),
                thr,
                _ms([s["final"].get("eval/accuracy") for s in sm]),
                _ms([s.get("last10pct/completions/mean_length") for s in sm], "{:.1f}"),
                _ms([s.get("last10pct/kl") for s in sm], "{:.4f}"),
            ]
        )
    return rows


def table_columns(metric: str, threshold) -> list[str]:
    thr = f"steps to {metric} ≥ {threshold}" if threshold is not None else "steps to threshold"
    return [
        "algorithm",
        "runs ok",
        f"{metric} at step 0",
        f"final {metric}",
        f"best {metric}",
        thr,
        "final eval/accuracy (greedy)",
        "response length (last 10%)",
        "KL (last 10%)",
    ]


# ----------------------------------------------------------------------------- plots
def _series(run: dict, key: str, source: str) -> dict[int, float]:
    """``{step: value}`` of one run; ``key`` may list fall-backs (``"beta/effective|beta"``)."""
    data = run["evals"] if source == "eval" else run["train"]
    pts: dict[int, float] = {}
    for k in key.split("|"):
        pts = {s: row[k] for s, row in data.items() if k in row}
        if pts:
            break
    if source == "train" and SMOOTH > 1 and pts:
        steps = sorted(pts)
        vals = [pts[s] for s in steps]
        sm = [
            sum(vals[max(0, i - SMOOTH + 1) : i + 1]) / len(vals[max(0, i - SMOOTH + 1) : i + 1])
            for i in range(len(vals))
        ]
        pts = dict(zip(steps, sm))
    return pts


def plot_task(task: str, runs: list[dict], algorithms: list[str], metric: str, out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = plt.get_cmap("tab10")
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for stem, title, panels in PLOTS:
        fig, axes = plt.subplots(1, len(panels), figsize=(4.8 * len(panels), 3.2), dpi=80, squeeze=False)
        drawn = False
        for ax, (key, source, label) in zip(axes[0], panels):
            key = key.format(metric=metric)
            for ci, algo in enumerate(algorithms):
                per_seed = [_series(r, key, source) for r in runs if r["algorithm"] == algo and r["status"] == "done"]
                per_seed = [p for p in per_seed if p]
                if not per_seed:
                    continue
                steps = sorted(set().union(*per_seed))
                mean, lo, hi = [], [], []
                for s in steps:
                    v = [p[s] for p in per_seed if s in p]
                    m = statistics.mean(v)
                    sd = statistics.stdev(v) if len(v) > 1 else 0.0
                    mean.append(m)
                    lo.append(m - sd)
                    hi.append(m + sd)  # noqa: E702
                c = colors(ci % 10)
                marker = "o" if source == "eval" else None
                ax.plot(steps, mean, color=c, marker=marker, ms=3, lw=1.5, label=f"{algo} (n={len(per_seed)})")
                ax.fill_between(steps, lo, hi, color=c, alpha=0.2, lw=0)
                drawn = True
            ax.set_xlabel("RL step")
            ax.set_ylabel(label or key.split("|")[-1])
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7, loc="best")
        smooth = f"; rolling mean over {SMOOTH} steps" if any(p[1] == "train" for p in panels) and SMOOTH > 1 else ""
        fig.suptitle(
            f"{task}: {title.replace('held-out accuracy', metric)}\n(mean ± std over seeds{smooth})", fontsize=9
        )
        fig.tight_layout()
        path = out_dir / f"{task}_{stem}.png"
        if drawn:
            fig.savefig(path)
            paths.append(path)
        plt.close(fig)
    return paths


# ----------------------------------------------------------------------------- report
def _md_table(columns: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def write_report(sweep_dir: Path | str, *, wandb_log: bool | None = None) -> Path:
    """Write ``report.md`` and the plots of a sweep (and log them to W&B); returns the report path."""
    sweep_dir = Path(sweep_dir).resolve()
    suite, runs = collect(sweep_dir)
    ev = suite.get("eval") or {}
    metric, threshold = ev.get("metric", "eval/accuracy"), ev.get("threshold")
    tasks = list(dict.fromkeys([r["task"] for r in runs]))
    algorithms = list(dict.fromkeys(list(suite.get("algorithms") or []) + [r["algorithm"] for r in runs]))
    name = suite.get("name", sweep_dir.name)
    md = [f"# Benchmark report: suite `{name}`", ""]
    if suite.get("description"):
        md += [str(suite["description"]).strip(), ""]
    n_ok = sum(r["status"] == "done" for r in runs)
    md += [
        f"Sweep directory: `{sweep_dir}`. Runs: {n_ok}/{len(runs)} finished "
        f"({len(tasks)} task(s) x {len(algorithms)} algorithm(s) x {len(suite.get('seeds') or [])} seed(s)); "
        f"budget {suite.get('steps', '?')} RL steps per run.",
        "",
        f"Cells are mean ± std over the seeds that finished. `{metric}` is measured on the held-out split "
        f"(eval every {ev.get('every', '?')} steps on {ev.get('size', '?')} questions, pass@{ev.get('pass_k', 1)} "
        f'from {ev.get("samples") or ev.get("pass_k", 1)} samples); "steps to ≥ {threshold}" is the first evaluation '
        "step at which a run reached it (over the runs that did; k/n = how many did). Response length and KL are "
        "training-batch means over the last 10% of the steps.",
        "",
    ]
    walls = [r["wall_s"] for r in runs if r["status"] == "done" and r.get("wall_s")]
    cpus = [r["cpu_s"] for r in runs if r["status"] == "done" and r.get("cpu_s")]
    if walls:
        line = f"Run time: {statistics.mean(walls):.0f} s wall per run on average" + (
            f" ({statistics.mean(cpus):.0f} s CPU)" if cpus else ""
        )
        try:
            st = json.loads((sweep_dir / "sweep_status.json").read_text())
            if st.get("done"):
                line += (
                    f"; the last `benchmarks.run` took {st['wall_s'] / 60:.1f} min wall for {st['done']} run(s) "
                    f"({st.get('jobs', 1)} at a time, {st.get('skipped', 0)} skipped as finished before)"
                )
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            pass
        md += [line + ".", ""]
    tables: dict[str, tuple[list[str], list[list[str]]]] = {}
    plots: dict[str, list[Path]] = {}
    for task in tasks:
        tr = [r for r in runs if r["task"] == task]
        cols, rows = table_columns(metric, threshold), table_rows(tr, algorithms, metric, threshold)
        tables[task] = (cols, rows)
        plots[task] = plot_task(task, tr, algorithms, metric, sweep_dir / "plots")
        md += [f"## Task `{task}`", ""]
        overrides = (suite.get("tasks") or {}).get(task)
        if overrides:
            md += [f"Overrides: `{' '.join(map(str, overrides))}`", ""]
        md += [_md_table(cols, rows), ""]
        bad = [r for r in tr if r["status"] != "done"]
        if bad:
            md += ["Failed or missing runs:", ""]
            md += [f"- `{r['algorithm']}` seed {r['seed']} ({r['status']}): {r.get('error', '')}" for r in bad]
            md += [""]
        if plots[task]:
            md += [f"![{p.stem}](plots/{p.name})" for p in plots[task]] + [""]
    path = sweep_dir / "report.md"
    path.write_text("\n".join(md))
    lg = suite.get("logger") or {}
    if wandb_log is None:
        wandb_log = bool(lg.get("wandb", True)) and lg.get("wandb_mode", "offline") != "disabled"
    if wandb_log:
        try:
            log_to_wandb(sweep_dir, suite, tables, plots, runs)
        except Exception as e:  # noqa: BLE001 - the Markdown report stands without W&B
            log.warning("benchmarks.report: W&B logging failed (%s: %s); report.md written", type(e).__name__, e)
    return path


def log_to_wandb(sweep_dir: Path, suite: dict, tables, plots, runs) -> None:
    import os

    import wandb

    lg = suite.get("logger") or {}
    os.environ.setdefault("WANDB_SILENT", "true")
    group = suite.get("group") or sweep_dir.name
    run = wandb.init(
        project=lg.get("project", "apo-rl"),
        group=group,
        name=f"{group}-report",
        job_type="report",
        dir=str(sweep_dir),
        mode=lg.get("wandb_mode", "offline"),
        config={"suite": suite},
        reinit=True,
    )
    try:
        payload: dict[str, Any] = {}
        for task, (cols, rows) in tables.items():
            payload[f"report/{task}/table"] = wandb.Table(columns=cols, data=rows)
            for p in plots.get(task, []):
                payload[f"report/{task}/{p.stem[len(task) + 1 :]}"] = wandb.Image(str(p))
        payload["report/runs"] = wandb.Table(
            columns=["task", "algorithm", "seed", "status", "error"],
            data=[[r["task"], r["algorithm"], r["seed"], r["status"], r.get("error") or ""] for r in runs],
        )
        run.log(payload)
    finally:
        run.finish()


def main(argv: list[str] | None = None) -> None:
    from framework.run import setup_console_logging

    setup_console_logging()
    ap = argparse.ArgumentParser(description="(Re)write the report of a benchmark sweep.")
    ap.add_argument("sweep_dir")
    ap.add_argument("--no-wandb", action="store_true", help="do not log the report to W&B")
    a = ap.parse_args(argv)
    d = Path(a.sweep_dir)
    if not d.is_dir():
        print(f"error: {d} is not a directory", file=sys.stderr)
        sys.exit(2)
    path = write_report(d, wandb_log=False if a.no_wandb else None)
    print(path.read_text())
    print(f"benchmarks.report: {path}")


if __name__ == "__main__":
    main()
