"""Report of a benchmark sweep: ``python -m benchmarks.report <sweep_dir>``.

Reads every run of ``<sweep_dir>/<task>/<algorithm>/seed<k>/`` (``csv/metrics.csv``, ``DONE.json``
/ ``FAILED.json``, the run's config ``.hydra/config.yaml``) and the sweep's ``suite.yaml``, and
writes

* ``<sweep_dir>/report.md``: per task, a table with mean ± sd over seeds per algorithm of the
  initial, final and best held-out accuracy (``suite.eval.metric``; "best" and "steps to
  ``suite.eval.threshold``" over the trained steps only, step 0 excluded, and no step count
  for a run already at the threshold at step 0), the change final − step 0 with its bootstrap
  confidence interval over seeds, the final greedy accuracy, the response length and the KL
  (means over the last 10% of the training steps); each algorithm's recipe (the config keys
  that apply and whose values differ between the compared runs, the reward weights, where a
  run departs from the published recipe); failed runs with their own error and a link to their
  ``console.log``; the values that stayed constant (not plotted); the figures with captions;
* ``<sweep_dir>/plots/<task>_<figure>.{png,pdf,csv}``: the figures at paper size (3.5 in one
  column or 7 in full width, 300 dpi PNG and a vector PDF) and the plotted numbers. One line
  per algorithm (mean over seeds; its own colour, dash pattern and marker, so overlapping
  curves stay apart) with a shaded percentile-bootstrap confidence interval over seeds
  (:func:`bootstrap_ci`: torchmetrics ``BootStrapper``); accuracy-type metrics per reward
  component (``rewards/<name>/mean``, unweighted), the weighted total in its own figure whose
  title says when the weights differ between algorithms; schedules (β, learning rate) and
  evaluations raw, noisy batch statistics as a trailing rolling mean (the caption says which);
  human-readable axis labels, one legend below the panels; a panel that is flat for every
  algorithm is not drawn (the report states its value);
* one W&B run per sweep (offline by default; its id kept in ``wandb_report_id.txt``, so a
  re-report continues it) in the sweep's group with the tables (``wandb.Table``) and the plots
  (``wandb.Image``).

Metrics come from Lightning's CSV log: training rows are keyed by the RL step (``rl_step``,
1..N), held-out evaluations by ``eval/step`` (the RL step they were made at: 0 = before any
training, every N, the last).
"""

from __future__ import annotations

import argparse
import csv
import functools
import json
import logging
import math
import os
import statistics
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from framework.errors import DataError

log = logging.getLogger("benchmarks.report")  # not __name__: that is "__main__" under python -m

DONE, FAILED, LOG = "DONE.json", "FAILED.json", "console.log"
RUN_CONFIG = Path(".hydra") / "config.yaml"  # written by Hydra into the run directory (hydra.run.dir)
TRAIN_KEYS = ("reward", "accuracy", "kl", "beta", "entropy", "completions/mean_length")
SMOOTH = 5  # trailing rolling mean over this many RL steps for the noisy training curves
CI_LEVEL = 0.95  # the bootstrap confidence interval drawn as a band
N_BOOT = 1000  # bootstrap resamples of the seeds
BOOT_SEED = 0  # the resampling is seeded: the report is reproducible
DPI = 300
COLUMN_W, FULL_W = 3.5, 7.0  # inches: one column / the full width of a two-column paper
# config keys that name the run rather than its recipe (never listed as a recipe difference)
PER_RUN_KEYS = ("seed", "output_dir", "resume", "logger.name", "logger.tags", "logger.group")
COLORS = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000", "#F0E442")  # Okabe-Ito
DASHES = ("-", "--", "-.", ":", (0, (5, 1, 1, 1)), (0, (1, 1)), (0, (8, 2)), (0, (3, 1, 1, 1, 1, 1)))
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


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
            step = vals.get("rl_step", vals.get("step"))  # the RL step
            if "reward" in vals and step is not None:
                train[int(step)] = vals
            ev = {k: v for k, v in vals.items() if k.startswith("eval/")}
            at = vals.get("eval/step", step)  # the RL step the evaluation was made at
            if at is not None and set(ev) - {"eval/step"}:
                evals.setdefault(int(at), ev)  # its first row (a forward-filling logger repeats it)
    return train, evals


def summarize_run(run_dir: Path, metric: str = "eval/accuracy", threshold: float | None = None) -> dict:
    """Final / best held-out metrics, the change from step 0, the first step reaching
    ``threshold`` and training averages.

    "best" and "steps to threshold" are over the trained steps only: step 0 is the model before
    any training. A run whose step-0 evaluation already reaches ``threshold`` has no "steps to
    threshold" (None, with ``threshold_at_start`` True)."""
    train, evals = read_metrics(run_dir)
    if not evals:
        raise DataError(f"{run_dir}: no held-out evaluation in csv/metrics.csv (column eval/step)")
    steps = sorted(evals)
    trained = [(s, evals[s][metric]) for s in steps if s > 0 and evals[s].get(metric) is not None]
    out: dict[str, Any] = {
        "metric": metric,
        "final": evals[steps[-1]],
        "initial": evals[steps[0]],
        "eval_steps": steps,
        "train_steps": len(train),
    }
    out["best"] = max((v for _, v in trained), default=None)
    out["best_step"] = max(trained, key=lambda sv: sv[1])[0] if trained else None
    start, end = evals[steps[0]].get(metric), evals[steps[-1]].get(metric)
    # the change over training: final - step 0 (None without an evaluation before training)
    out["change"] = end - start if steps[0] == 0 and len(steps) > 1 and None not in (start, end) else None
    # "steps to threshold" counts training steps: a model already at the threshold before any
    # training (step 0) reached it in no step, and the count is left empty (threshold_at_start)
    at_start = threshold is not None and steps[0] == 0 and start is not None and start >= float(threshold)
    out["threshold_at_start"] = bool(at_start)
    out["steps_to_threshold"] = (
        None if threshold is None or at_start else next((s for s, v in trained if v >= float(threshold)), None)
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


def load_run_config(run_dir: Path, command: list[str] | None = None) -> dict | None:
    """The run's composed config: ``.hydra/config.yaml`` (Hydra writes it when the run starts),
    else composed now from the run's overrides (``command`` of DONE.json / FAILED.json); None
    when neither works."""
    from omegaconf import OmegaConf

    p = Path(run_dir) / RUN_CONFIG
    try:
        if p.exists():
            cfg = OmegaConf.load(p)
        elif command:
            from benchmarks.run import compose_run_config

            cfg = compose_run_config([c for c in command if not str(c).startswith("hydra.")])
        else:
            return None
    except Exception as e:  # noqa: BLE001 - the report stands without the recipe
        log.warning("benchmarks.report: %s: no config (%s: %s)", run_dir, type(e).__name__, e)
        return None
    try:
        return OmegaConf.to_container(cfg, resolve=True)
    except Exception:  # noqa: BLE001 - an interpolation that only resolves inside the run
        return OmegaConf.to_container(cfg, resolve=False)


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (lists are values)."""
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict) and v:
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out


def reward_weights(cfg: dict | None) -> dict[str, float] | None:
    """``{component: weight}`` of the run's total reward, as :class:`rewards.RewardSet`
    builds it (weight 1.0 when unset; the correctness plugin with weight 0 when not a component)."""
    if not cfg or not isinstance(cfg.get("reward"), dict):
        return None
    r = cfg["reward"]
    comps = r.get("components") or {}
    w = {str(k): float((v or {}).get("weight", 1.0)) for k, v in comps.items()}
    w.setdefault(str(r.get("correctness", "accuracy")), 0.0)
    return w


def _num(v: float) -> str:
    return f"{v:g}"


def weights_text(w: dict[str, float]) -> str:
    """``"1 accuracy + 0.5 format"`` (components of weight 0 left out)."""
    return " + ".join(f"{_num(v)} {k}" for k, v in w.items() if v) or "0"


# ----------------------------------------------------------------------------- the sweep
def _load_suite(sweep_dir: Path) -> dict:
    p = sweep_dir / "suite.yaml"
    if p.exists():
        from omegaconf import OmegaConf

        return OmegaConf.to_container(OmegaConf.load(p), resolve=True)
    return {}


def collect(sweep_dir: Path) -> tuple[dict, list[dict]]:
    """The suite and one entry per run directory (task, algorithm, seed, status, config, ...)."""
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
        entry: dict[str, Any] = {"task": task, "algorithm": algo, "seed": seed, "dir": d, "config": None}
        info: dict = {}
        if (d / DONE).exists():
            try:
                info = json.loads((d / DONE).read_text())
                entry.update(wall_s=info.get("wall_s"), cpu_s=info.get("cpu_s"))
                entry.update(status="done", summary=summarize_run(d, metric, threshold))
                entry["train"], entry["evals"] = read_metrics(d)
            except Exception as e:  # noqa: BLE001
                entry.update(status="failed", error=f"metrics unreadable: {e}")
        elif (d / FAILED).exists():
            info = json.loads((d / FAILED).read_text())
            entry.update(status="failed", error=info.get("error", "?"))
            entry["log"] = Path(info["log"]) if info.get("log") else d / LOG
        else:
            entry.update(status="missing", error="not run (or still running)")
        if entry["status"] != "missing":  # (a failed run's command may not compose: only its own config)
            entry["config"] = load_run_config(d, info.get("command") if entry["status"] == "done" else None)
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
        at_start = sum(bool(s.get("threshold_at_start")) for s in sm)
        counted = len(ok) - at_start  # the runs that started below the threshold
        if threshold is None or not ok:
            thr = "—"
        elif not counted:
            thr = f"at step 0 already ({at_start}/{len(ok)})"
        elif reached:
            thr = f"{_ms([float(x) for x in reached], '{:.0f}')} ({len(reached)}/{counted})"
        else:
            thr = f"not reached (0/{counted})"
        if threshold is not None and ok and counted and at_start:
            thr += f"; at step 0 already: {at_start}/{len(ok)}"
        rows.append(
            [
                algo,
                f"{len(ok)}/{len(rs)}",
                _ms([s["initial"].get(metric) for s in sm]),
                _ms([s["final"].get(metric) for s in sm]),
                change_text([s.get("change") for s in sm]),
                _ms([s.get("best") for s in sm]),
                thr,
                _ms([s["final"].get("eval/accuracy") for s in sm]),
                _ms([s.get("last10pct/completions/mean_length") for s in sm], "{:.1f}"),
                _ms([s.get("last10pct/kl") for s in sm], "{:.4f}"),
            ]
        )
    return rows


def change_text(changes: list[float | None], level: float = CI_LEVEL) -> str:
    """``"+0.050 [+0.010, +0.090]"``: the mean over seeds of final - step 0 and its
    percentile-bootstrap confidence interval over the seeds (:func:`bootstrap_ci`); the value
    alone for one seed."""
    vals = [c for c in changes if c is not None]
    if not vals:
        return "—"
    mean = statistics.fmean(vals)
    if len(vals) == 1:
        return f"{mean:+.3f}"
    import numpy as np

    lo, hi = (float(np.ravel(b)[0]) for b in bootstrap_ci([[v] for v in vals], level=level))
    return f"{mean:+.3f} [{lo:+.3f}, {hi:+.3f}]"


def table_columns(metric: str, threshold) -> list[str]:
    thr = f"first step ≥ 1 with {metric} ≥ {threshold}" if threshold is not None else "steps to threshold"
    return [
        "algorithm",
        "runs ok",
        f"{metric} at step 0",
        f"final {metric}",
        f"change final − step 0 [{CI_LEVEL:.0%} CI]",
        f"best {metric} (steps ≥ 1)",
        thr,
        "final eval/accuracy (greedy)",
        "response length (last 10%)",
        "KL (last 10%)",
    ]


def _show(v: Any, limit: int = 60) -> str:
    s = "null" if v is None else json.dumps(v, ensure_ascii=False) if isinstance(v, (list, dict)) else str(v)
    return s if len(s) <= limit else s[: limit - 1] + "…"


def key_applies(flat: dict[str, Any], key: str) -> bool:
    """Whether config key ``key`` has an effect in the run whose flattened config is ``flat``:
    not when a section above it is switched off (``algorithm.stcr.lam`` with
    ``algorithm.stcr.enabled=false``), not a KL-schedule parameter the run's schedule does not
    take (``algorithm.kl.schedule.beta_max`` under ``constant``; ``algorithm.kl.coef`` under
    ``grpo_d``), not ``optim.min_lr_ratio`` under the constant learning rate."""
    if key not in flat:
        return False
    parts = key.split(".")
    for i in range(1, len(parts) - 1 + (parts[-1] != "enabled")):
        if flat.get(".".join(parts[:i]) + ".enabled") is False and key != ".".join(parts[:i]) + ".enabled":
            return False
    sched = flat.get("algorithm.kl.schedule.name")
    if key.startswith("algorithm.kl.schedule.") and key != "algorithm.kl.schedule.name" and sched is not None:
        from algorithms.schedules import SCHEDULES

        spec = SCHEDULES.get(str(sched))
        return spec is None or parts[-1] in spec.params
    if key == "algorithm.kl.coef" and sched is not None:
        # the constant schedule's value; linear / cosine fall back to it for an unset start or end
        s = "algorithm.kl.schedule."
        return sched == "constant" or (
            sched in ("linear", "cosine") and None in (flat.get(s + "start"), flat.get(s + "end"))
        )
    if key == "optim.min_lr_ratio":
        return flat.get("optim.scheduler") not in ("constant", None)
    return True


def recipe_rows(runs: list[dict], algorithms: list[str]) -> list[list[str]]:
    """``[key, value per algorithm...]`` for every config key whose value differs between the
    compared runs (keys that only name a run, such as the seed, left out). Only keys that apply
    count (:func:`key_applies`): a key without effect in a run is ``n/a`` in its cell, and a key
    that applies to no compared run is left out. Several values of one algorithm (its seeds
    differ) are joined with `` / ``."""
    flat = {a: [flatten(r["config"]) for r in runs if r["algorithm"] == a and r.get("config")] for a in algorithms}
    flat = {a: fs for a, fs in flat.items() if fs}
    if len(flat) < 2:
        return []
    keys = sorted({k for fs in flat.values() for f in fs for k in f})
    rows = []
    _na = object()

    def value(f: dict, k: str) -> Any:
        return f[k] if key_applies(f, k) else _na

    for k in keys:
        if any(k == p or k.startswith(p + ".") for p in PER_RUN_KEYS):
            continue
        vals = {a: [value(f, k) for f in fs] for a, fs in flat.items()}
        if all(v is _na for vs in vals.values() for v in vs):
            continue
        if len({"n/a" if v is _na else json.dumps(v, default=str) for vs in vals.values() for v in vs}) < 2:
            continue
        cells = []
        for a in algorithms:
            if a not in flat:
                cells.append("")
                continue
            shown = list(dict.fromkeys("n/a" if v is _na else _show(v) for v in vals[a]))
            cells.append(" / ".join(f"`{c}`" if c != "n/a" else c for c in shown))
        rows.append([f"`{k}`", *cells])
    return rows


def published_recipe_notes(runs: list[dict], algorithms: list[str]) -> list[str]:
    """Per algorithm, where its run departs from the published recipe (framework/recipes.py)."""
    from framework.recipes import recipe_differences, recipe_for

    out = []
    for a in algorithms:
        cfg = next((r["config"] for r in runs if r["algorithm"] == a and r.get("config")), None)
        if not cfg:
            continue
        try:
            rec, diffs = recipe_for(cfg), recipe_differences(cfg)
        except Exception:  # noqa: BLE001 - informative only
            continue
        if rec is None:
            continue
        if diffs:
            shown = "; ".join(f"`{d}`" for d in diffs[:8]) + (f"; … ({len(diffs) - 8} more)" if len(diffs) > 8 else "")
            out.append(f"- `{a}` departs from the published {rec.label} recipe in: {shown}")
        else:
            out.append(f"- `{a}` is the published {rec.label} recipe")
    return out


def weights_by_algorithm(runs: list[dict], algorithms: list[str]) -> dict[str, list[dict[str, float] | None]]:
    """Every run's total-reward weights, by algorithm (None: the run's config is unknown)."""
    out: dict[str, list] = {}
    for a in algorithms:
        ws = [reward_weights(r.get("config")) for r in runs if r["algorithm"] == a and r["status"] == "done"]
        if ws:
            out[a] = ws
    return out


NOT_COMPARABLE = (
    " The reward weights differ between the algorithms: their totals are not comparable; compare the"
    " components (the per-component figure)."
)


def total_reward_note(weights: dict[str, list[dict[str, float] | None]]) -> tuple[bool, str]:
    """``(differ, note)`` for the title of the total-reward plot."""
    known = {a: [w for w in ws if w is not None] for a, ws in weights.items()}
    unknown = [a for a, ws in weights.items() if len(known[a]) < len(ws)]
    distinct = {json.dumps(w, sort_keys=True) for ws in known.values() for w in ws}
    if len(distinct) > 1:
        groups: dict[str, list[str]] = {}  # the weights -> the algorithms with them
        for a, ws in known.items():
            if ws:
                groups.setdefault(" / ".join(dict.fromkeys(weights_text(w) for w in ws)), []).append(a)
        per = "; ".join(f"{', '.join(algos)}: {text}" for text, algos in groups.items())
        return True, f"WEIGHTS DIFFER ({per})"
    if unknown:
        return False, f"reward weights unknown for {', '.join(unknown)}"
    if distinct:
        return False, f"= {weights_text(json.loads(distinct.pop()))} for every algorithm"
    return False, ""


# ----------------------------------------------------------------------------- statistics
def rolling_mean(pts: dict[int, float], window: int = SMOOTH) -> dict[int, float]:
    """Trailing mean over the last ``window`` points (fewer at the start)."""
    steps = sorted(pts)
    vals = [pts[s] for s in steps]
    return {s: statistics.fmean(vals[max(0, i - window + 1) : i + 1]) for i, s in enumerate(steps)}


@functools.lru_cache(maxsize=1)
def _column_mean_metric() -> type:
    """A torchmetrics ``Metric``: the column means of the rows it is updated with (here the mean
    over seeds at every step), the statistic :class:`torchmetrics.wrappers.BootStrapper` resamples."""
    import torch
    from torchmetrics import Metric

    class ColumnMean(Metric):
        full_state_update = False

        def __init__(self) -> None:
            super().__init__()
            self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
            self.add_state("count", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

        def update(self, x: torch.Tensor) -> None:
            self.total = self.total + x.sum(0)
            self.count = self.count + x.shape[0]

        def compute(self) -> torch.Tensor:
            return self.total / self.count

    return ColumnMean


@functools.lru_cache(maxsize=4)
def _bootstrapper(n_boot: int):
    from torchmetrics.wrappers import BootStrapper

    # multinomial: every resample draws n seeds out of n with replacement (the textbook bootstrap;
    # "poisson" approximates it for large n only)
    return BootStrapper(
        _column_mean_metric()(), num_bootstraps=n_boot, mean=False, std=False, raw=True, sampling_strategy="multinomial"
    )


def bootstrap_ci(values, level: float = CI_LEVEL, n_boot: int = N_BOOT, seed: int = BOOT_SEED):
    """Percentile-bootstrap confidence interval of the mean over seeds, per step.

    ``values``: ``(n_seeds, n_steps)``. torchmetrics' ``BootStrapper`` resamples the seeds (rows)
    with replacement ``n_boot`` times (torch's generator seeded with ``seed``; a seed is resampled
    as a whole run, all its steps together) and keeps every resample's column means; the interval
    is their ``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles (``torch.quantile``, linear
    interpolation). Returns ``(low, high)`` arrays of ``n_steps``."""
    import numpy as np
    import torch

    x = torch.as_tensor(np.asarray(values, dtype=float), dtype=torch.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"bootstrap_ci needs (n_seeds >= 2, n_steps) values, got shape {tuple(x.shape)}")
    boot = _bootstrapper(int(n_boot))
    boot.reset()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        boot.update(x)
    raw = boot.compute()["raw"]  # (n_boot, n_steps): the mean over each resample of the seeds
    a = (1.0 - level) / 2
    q = torch.quantile(raw, torch.tensor([a, 1.0 - a], dtype=raw.dtype), dim=0)
    return q[0].numpy(), q[1].numpy()


# ----------------------------------------------------------------------------- plots
@dataclass(frozen=True)
class Panel:
    key: str  # the metric; "a|b": the first one a run logged
    source: str  # "train" (by RL step 1..N) or "eval" (by evaluation step: 0 = before training)
    label: str
    smooth: bool  # True: trailing rolling mean over SMOOTH steps (noisy batch means); False: raw


@dataclass(frozen=True)
class FigureSpec:
    stem: str
    title: str
    panels: tuple[Panel, ...]


@dataclass
class Plot:
    stem: str
    png: Path
    pdf: Path
    data: Path  # the plotted numbers (CSV)
    title: str
    caption: str
    figure: Any = None  # the matplotlib figure (kept only when asked for)


def reward_components(runs: list[dict]) -> list[str]:
    """The reward components logged by any run (``rewards/<name>/mean``), in first-seen order."""
    names: dict[str, None] = {}
    for r in runs:
        for row in (r.get("train") or {}).values():
            for k in row:
                parts = k.split("/")
                if len(parts) == 3 and parts[0] == "rewards" and parts[2] == "mean" and parts[1] != "total":
                    names.setdefault(parts[1])
    return list(names)


# the y-axis label of a held-out metric (the key itself is in the plotted data's CSV)
EVAL_LABELS = {
    "eval/accuracy": "held-out accuracy (greedy)",
    "eval/accuracy_sampled": "held-out accuracy (sampled)",
    "eval/pass@k": "held-out pass@{k}",
    "eval/format": "held-out format score",
    "eval/mean_length": "held-out response length (tokens)",
}


def _pass_k(runs: list[dict]) -> int | None:
    ks = {(r.get("config") or {}).get("trainer", {}).get("eval_pass_k") for r in runs if r.get("config")}
    ks.discard(None)
    return int(ks.pop()) if len(ks) == 1 else None


def metric_label(key: str, pass_k: int | None = None) -> str:
    """A human-readable name of a metric key (``eval/accuracy_sampled`` -> ``held-out accuracy
    (sampled)``); an unknown key is shown as it is."""
    if key in EVAL_LABELS:
        return EVAL_LABELS[key].format(k=pass_k if pass_k else "k")
    parts = key.split("/")
    if len(parts) == 3 and parts[0] == "rewards" and parts[2] == "mean":
        return f"{parts[1].replace('_', ' ')} reward"
    return key


def figure_specs(metric: str, runs: list[dict]) -> list[FigureSpec]:
    evals = list(dict.fromkeys([metric, "eval/accuracy", "eval/pass@k", "eval/format"]))
    logged = {k for r in runs for row in (r.get("evals") or {}).values() for k in row}
    evals = [k for k in evals if k in logged] or [metric]
    comps = reward_components(runs)
    k = _pass_k(runs)
    return [
        FigureSpec(
            "accuracy", "held-out evaluation", tuple(Panel(e, "eval", metric_label(e, k), False) for e in evals)
        ),
        FigureSpec(
            "reward",
            "training reward per component (batch mean of each unweighted score)",
            tuple(Panel(f"rewards/{c}/mean", "train", metric_label(f"rewards/{c}/mean"), True) for c in comps),
        ),
        FigureSpec(
            "reward_total",
            "total training reward",
            (Panel("reward|rewards/total/mean", "train", "total reward (weighted)", True),),
        ),
        FigureSpec(
            "kl_beta",
            "KL to the reference and the KL weight",
            (
                Panel("kl", "train", "KL to reference (per token)", True),
                Panel("beta/effective|beta", "train", "KL weight β (APO: mean β_i)", False),
            ),
        ),
        FigureSpec("lr", "learning rate", (Panel("lr", "train", "learning rate", False),)),
        FigureSpec("entropy", "policy entropy on sampled tokens", (Panel("entropy", "train", "entropy (nats)", True),)),
        FigureSpec(
            "length",
            "response length (batch mean)",
            (Panel("completions/mean_length", "train", "response length (tokens)", True),),
        ),
    ]


def _series(run: dict, key: str, source: str) -> dict[int, float]:
    """``{step: value}`` of one run, raw; ``key`` may list fall-backs (``"beta/effective|beta"``)."""
    data = (run.get("evals") if source == "eval" else run.get("train")) or {}
    for k in key.split("|"):
        pts = {s: row[k] for s, row in data.items() if k in row}
        if pts:
            return pts
    return {}


@dataclass
class Curve:
    algorithm: str
    steps: list[int]
    mean: list[float]
    low: list[float] | None  # the bootstrap interval (None: one seed)
    high: list[float] | None
    n_seeds: int


def curve(runs: list[dict], algorithm: str, panel: Panel) -> Curve | None:
    """The mean over the finished seeds of ``algorithm`` (each smoothed first when the panel is)
    at the steps every seed logged, with its bootstrap interval."""
    import numpy as np

    per_seed = [
        _series(r, panel.key, panel.source) for r in runs if r["algorithm"] == algorithm and r["status"] == "done"
    ]
    per_seed = [rolling_mean(p) if panel.smooth else p for p in per_seed if p]
    if not per_seed:
        return None
    steps = sorted(set.intersection(*(set(p) for p in per_seed)))
    if not steps:
        return None
    x = np.array([[p[s] for s in steps] for p in per_seed], dtype=float)
    lo = hi = None
    if len(per_seed) > 1:
        lo, hi = (v.tolist() for v in bootstrap_ci(x))
    return Curve(algorithm, steps, x.mean(0).tolist(), lo, hi, len(per_seed))


def _layout(n: int) -> tuple[int, int, tuple[float, float]]:
    if n == 1:
        return 1, 1, (COLUMN_W, 2.6)
    if n == 2:
        return 1, 2, (FULL_W, 2.6)
    if n == 4:
        return 2, 2, (FULL_W, 4.6)
    rows = math.ceil(n / 3)
    return rows, 3, (FULL_W, 0.3 + 2.3 * rows)


def _seeds_text(ns: dict[str, int]) -> str:
    if len(set(ns.values())) == 1:
        n = next(iter(ns.values()))
        return f"n = {n} seed{'s' if n != 1 else ''} per algorithm"
    return "seeds per algorithm: " + ", ".join(f"{a} n = {n}" for a, n in ns.items())


def caption(title: str, drawn: list[Panel], ns: dict[str, int], same: list[Panel] | None = None) -> str:
    """What the figure shows: seeds, the band, the smoothing of every panel. ``same``: panels
    whose values are the same in every seed (no band is drawn there)."""
    lo = min(ns.values())
    same = same or []
    if same and len(same) == len(drawn):
        band = "no band: every seed has the same values"
    else:
        band = (
            f"shaded: {CI_LEVEL:.0%} percentile-bootstrap confidence interval of that mean ({N_BOOT} resamples "
            "of the seeds, torchmetrics BootStrapper)"
        )
        if lo == 2:
            band += " — with 2 seeds every resample is one of the runs or their mean, so it only spans the two runs"
        if lo == 1:
            band += "; none where an algorithm has one seed"
        if same:
            band += f"; no band for {', '.join(p.label for p in same)}: the same in every seed"
    smooth = "; ".join(
        f"{p.label}: trailing rolling mean over {SMOOTH} RL steps (of each seed, before averaging)"
        if p.smooth
        else f"{p.label}: none (raw values)"
        for p in drawn
    )
    x = (
        "RL step (evaluations at step 0 are before any training)"
        if any(p.source == "eval" for p in drawn)
        else "RL step"
    )
    return f"{title}. Lines: mean over seeds ({_seeds_text(ns)}); {band}. Smoothing: {smooth}. x-axis: {x}."


def _smoothing_note(drawn: list[Panel]) -> str:
    """The figure's own short label of its smoothing (the caption has the long one)."""
    if all(p.smooth for p in drawn):
        return f"smoothing: {SMOOTH}-step trailing mean"
    if not any(p.smooth for p in drawn):
        return "no smoothing"
    short = [p.label.split(" (")[0] for p in drawn]
    return "smoothing: " + ", ".join(
        f"{name} {SMOOTH}-step mean" if p.smooth else f"{name} raw" for name, p in zip(short, drawn)
    )


def _span(vals) -> float:
    return max(vals) - min(vals) if len(vals) else 0.0


def _flat(vals, tol: float = 1e-9) -> bool:
    """All values equal up to a relative ``tol`` (float noise)."""
    vals = list(vals)
    return not vals or _span(vals) <= tol * max(1e-300, max(abs(v) for v in vals))


def _is_constant(c: Curve) -> bool:
    """The curve is one value at every step (a flat line), its band too (the seeds do not move
    in opposite directions under a flat mean)."""
    return _flat(c.mean) and (c.low is None or (_flat(c.low) and _flat(c.high)))


def _no_band(c: Curve) -> bool:
    """Every seed has the same values (the interval has no width)."""
    return c.low is None or all(_flat([lo, hi]) for lo, hi in zip(c.low, c.high))


@dataclass
class Constant:
    """A panel not drawn because every algorithm's curve is flat: ``{algorithm: value}``."""

    task: str
    label: str
    key: str
    values: dict[str, float]

    def text(self) -> str:
        vals = {a: f"{v:.4g}" for a, v in self.values.items()}
        if len(set(vals.values())) == 1:
            return f"{self.label}: {next(iter(vals.values()))} for every algorithm"
        return f"{self.label}: " + ", ".join(f"{a} {v}" for a, v in vals.items())


def quiet_plotting_loggers() -> None:
    """matplotlib's PDF backend subsets fonts with fontTools, which logs every table it touches at
    INFO (hundreds of ``[fontTools.subset][INFO]`` lines per sweep once a caller such as Hydra's
    job logging sets the root logger to INFO); matplotlib itself logs font-cache notes at INFO.
    Both are set to WARNING at their source: their warnings and errors still show."""
    for name in ("fontTools", "matplotlib"):
        logging.getLogger(name).setLevel(logging.WARNING)


def plot_task(
    task: str,
    runs: list[dict],
    algorithms: list[str],
    metric: str,
    out_dir: Path,
    *,
    keep_figures: bool = False,
    constants: list[Constant] | None = None,
) -> list[Plot]:
    """Draw and save every figure of one task (PNG, PDF and the plotted data as CSV). A panel in
    which every algorithm's curve is flat is not drawn (a figure of only such panels is not
    written); it is appended to ``constants`` (the report states its value instead)."""
    quiet_plotting_loggers()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator, ScalarFormatter

    out_dir.mkdir(parents=True, exist_ok=True)
    weights = weights_by_algorithm(runs, algorithms)
    plots = []
    style = {
        "font.size": 7,
        "axes.titlesize": 7,
        "axes.labelsize": 7,
        "legend.fontsize": 6,
        "xtick.labelsize": 6,
        "ytick.labelsize": 6,
        "pdf.fonttype": 42,  # TrueType in the PDF: editable text, accepted by publishers
        "ps.fonttype": 42,
    }
    for spec in figure_specs(metric, runs):
        curves = {p: [c for a in algorithms if (c := curve(runs, a, p)) is not None] for p in spec.panels}
        drawn = [p for p in spec.panels if curves[p]]
        for p in [p for p in drawn if all(_is_constant(c) for c in curves[p])]:
            drawn.remove(p)  # no plot of a constant: the report states the value
            if constants is not None:
                constants.append(Constant(task, p.label, p.key, {c.algorithm: c.mean[0] for c in curves[p]}))
        for stale in (out_dir / f"{task}_{spec.stem}{ext}" for ext in (".png", ".pdf", ".csv")):
            stale.unlink(missing_ok=True)  # an earlier report's figure that this one does not draw
        if not drawn:
            continue
        title, differ = f"{task}: {spec.title}", False
        if spec.stem == "reward_total":
            differ, note = total_reward_note(weights)
            if note:
                title += (" — " if differ else " ") + note
        ns = {c.algorithm: c.n_seeds for p in drawn for c in curves[p]}
        # panels whose seeds all agree (a schedule): no band, and the figure says no CI there
        same = [p for p in drawn if all(c.low is not None and _no_band(c) for c in curves[p])]
        banded = any(not _no_band(c) for p in drawn for c in curves[p])
        sub = f"mean over seeds{f', {CI_LEVEL:.0%} bootstrap CI' if banded else ''}; {_smoothing_note(drawn)}"
        rows_n, cols_n, size = _layout(len(drawn))
        with plt.rc_context(style):
            fig, axes = plt.subplots(rows_n, cols_n, figsize=size, dpi=DPI, squeeze=False, layout="constrained")
            flat_axes = list(axes.flat)
            for ax in flat_axes[len(drawn) :]:
                ax.set_visible(False)
            legend: dict[str, Any] = {}  # label -> line: one legend for the figure
            for ax, panel in zip(flat_axes, drawn):
                n = len(curves[panel])
                dw, dm = (min(0.6, 1.8 / (n - 1)), min(1.5, 4.5 / (n - 1))) if n > 1 else (0.0, 0.0)
                for j, c in enumerate(curves[panel]):
                    i = algorithms.index(c.algorithm)
                    color = COLORS[i % len(COLORS)]
                    every = max(1, len(c.steps) // 8) if panel.source == "train" else 1
                    (line,) = ax.plot(
                        c.steps,
                        c.mean,
                        color=color,
                        linestyle=DASHES[i % len(DASHES)],
                        marker=MARKERS[i % len(MARKERS)],
                        # where curves coincide every one stays visible: each drawn over the previous
                        # one thinner, its markers smaller (concentric) and at other steps
                        markevery=(j % every, every),
                        ms=2.5 + dm * (n - 1 - j),
                        lw=0.9 + dw * (n - 1 - j),
                        label=f"{c.algorithm} (n={c.n_seeds})",
                        zorder=3 + j,
                    )
                    legend.setdefault(line.get_label(), line)
                    if not _no_band(c):
                        ax.fill_between(c.steps, c.low, c.high, color=color, alpha=0.18, lw=0, zorder=1)
                ax.set_xlabel("RL step")
                ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
                # plain tick labels; very small or large values as a common ×10^n factor, never an
                # additive offset or a long decimal (a learning rate of 3e-4 reads "3" with "×10⁻⁴")
                fmt = ScalarFormatter(useMathText=True, useOffset=False)
                fmt.set_powerlimits((-3, 4))
                ax.yaxis.set_major_formatter(fmt)
                ax.set_ylabel(panel.label)
                ax.grid(alpha=0.3, lw=0.5)
            # below the panels, outside every axis: a legend never covers a curve
            order = [f"{a} (n={ns[a]})" for a in algorithms if a in ns and f"{a} (n={ns[a]})" in legend]
            fig.legend(
                [legend[k] for k in order],
                order,
                loc="outside lower center",
                ncol=min(len(order), 5),
                frameon=False,
            )
            width_chars = int(size[0] * 15)
            fig.suptitle(textwrap.fill(title, width_chars) + "\n" + sub, fontsize=7)
            base = out_dir / f"{task}_{spec.stem}"
            png, pdf, data = base.with_suffix(".png"), base.with_suffix(".pdf"), base.with_suffix(".csv")
            fig.savefig(png, dpi=DPI)
            fig.savefig(pdf)
        with open(data, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["panel", "metric", "smoothing", "algorithm", "n_seeds", "step", "mean", "ci_low", "ci_high"])
            for panel in drawn:
                sm = f"rolling_mean_{SMOOTH}" if panel.smooth else "none"
                for c in curves[panel]:
                    for j, s in enumerate(c.steps):
                        lo = "" if c.low is None else repr(c.low[j])
                        hi = "" if c.high is None else repr(c.high[j])
                        w.writerow([panel.label, panel.key, sm, c.algorithm, c.n_seeds, s, repr(c.mean[j]), lo, hi])
        plots.append(
            Plot(
                spec.stem,
                png,
                pdf,
                data,
                title,
                caption(title, drawn, ns, same) + (NOT_COMPARABLE if spec.stem == "reward_total" and differ else ""),
                fig if keep_figures else None,
            )
        )
        if not keep_figures:
            plt.close(fig)
    return plots


# ----------------------------------------------------------------------------- report
def _md_table(columns: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _rel(path: Path, base: Path) -> str:
    try:
        return os.path.relpath(Path(path).resolve(), base)
    except ValueError:  # another drive
        return str(path)


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
        f"Cells are mean ± sd over the seeds that finished (sd: the spread of the runs, not a confidence "
        f"interval). `{metric}` is measured on the held-out split (eval every {ev.get('every', '?')} steps on "
        f"{ev.get('size', '?')} questions, pass@{ev.get('pass_k', 1)} from "
        f"{ev.get('samples') or ev.get('pass_k', 1)} samples); step 0 is the model before any training, so "
        f'"best" and "first step ≥ 1 with ≥ {threshold}" are over the trained steps only (k/n = how many of the '
        "runs that started below it reached it; a run already at it at step 0 is counted apart, with no step). "
        f'"change" is final − step 0 per run: its mean over seeds and the {CI_LEVEL:.0%} percentile-bootstrap '
        f"confidence interval of that mean ({N_BOOT} resamples of the seeds). "
        "Response length and KL are training-batch means over the last 10% of the steps.",
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
    plots: dict[str, list[Plot]] = {}
    for task in tasks:
        tr = [r for r in runs if r["task"] == task]
        cols, rows = table_columns(metric, threshold), table_rows(tr, algorithms, metric, threshold)
        tables[task] = (cols, rows)
        constants: list[Constant] = []
        plots[task] = plot_task(task, tr, algorithms, metric, sweep_dir / "plots", constants=constants)
        md += [f"## Task `{task}`", ""]
        overrides = (suite.get("tasks") or {}).get(task)
        if overrides:
            md += [f"Overrides: `{' '.join(map(str, overrides))}`", ""]
        md += [_md_table(cols, rows), ""]
        md += recipe_section(tr, algorithms)
        bad = [r for r in tr if r["status"] != "done"]
        if bad:
            md += ["Failed or missing runs:", ""]
            for r in bad:
                line = f"- `{r['algorithm']}` seed {r['seed']} ({r['status']}): {r.get('error', '')}"
                if r.get("log") is not None:
                    rel = _rel(r["log"], sweep_dir)
                    line += f" — its output: [`{rel}`]({rel})"
                md.append(line)
            md += [""]
        if constants:
            md += [
                "Constant over training in every run (not plotted): " + "; ".join(c.text() for c in constants) + ".",
                "",
            ]
        for i, p in enumerate(plots[task], 1):
            md += [
                f"![{p.stem}](plots/{p.png.name})",
                "",
                f"*Figure {task}-{i}.* {p.caption} Vector version: [`plots/{p.pdf.name}`](plots/{p.pdf.name}); "
                f"data: [`plots/{p.data.name}`](plots/{p.data.name}).",
                "",
            ]
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


def recipe_section(runs: list[dict], algorithms: list[str]) -> list[str]:
    """The "Recipes" part of a task: reward weights, config differences, published recipes."""
    md = ["### Recipes", ""]
    weights = weights_by_algorithm(runs, algorithms)
    if weights:
        md += [
            "Total reward per algorithm: "
            + "; ".join(
                f"`{a}` = " + " / ".join(dict.fromkeys(weights_text(w) if w else "unknown" for w in ws))
                for a, ws in weights.items()
            )
            + ".",
            "",
        ]
    rows = recipe_rows(runs, algorithms)
    shown = [a for a in algorithms if any(r["algorithm"] == a and r.get("config") for r in runs)]
    if rows:
        md += [
            "Config keys whose values differ between the compared runs (from each run's `.hydra/config.yaml`; "
            "the seed and the run's name and folder left out; every other key is the same for all). "
            "n/a: the key has no effect in that run (its section is switched off, or its schedule does not take it):",
            "",
            _md_table(["key", *shown], [[row[0], *[row[1 + algorithms.index(a)] for a in shown]] for row in rows]),
            "",
        ]
    elif len(shown) > 1:
        md += ["The compared runs' configs are the same except for the seed and the run's name and folder.", ""]
    else:
        md += ["No run config to compare (`.hydra/config.yaml` missing).", ""]
    notes = published_recipe_notes(runs, algorithms)
    if notes:
        md += notes + [""]
    return md


WANDB_ID_FILE = "wandb_report_id.txt"  # the sweep's report run id (one W&B run per sweep)


def report_wandb_id(sweep_dir: Path) -> str:
    """The W&B run id of the sweep's report: made once and kept in ``<sweep_dir>/wandb_report_id.txt``,
    so every re-report logs to the same W&B run instead of adding one."""
    p = Path(sweep_dir) / WANDB_ID_FILE
    try:
        rid = p.read_text().strip()
    except OSError:
        rid = ""
    if not rid:
        import secrets

        rid = secrets.token_hex(4)  # 8 characters of [0-9a-f], as W&B's own ids
        p.write_text(rid + "\n")
    return rid


def log_to_wandb(sweep_dir: Path, suite: dict, tables, plots, runs) -> None:
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
        # one W&B run per sweep: every re-report continues the run the first one created
        id=report_wandb_id(sweep_dir),
        resume="allow",
        reinit=True,
    )
    try:
        payload: dict[str, Any] = {}
        for task, (cols, rows) in tables.items():
            payload[f"report/{task}/table"] = wandb.Table(columns=cols, data=rows)
            for p in plots.get(task, []):
                payload[f"report/{task}/{p.stem}"] = wandb.Image(str(p.png), caption=p.caption)
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
