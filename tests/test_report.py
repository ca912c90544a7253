"""The sweep report (benchmarks/report.py) on a fixture sweep written here with known values, in
the layout ``benchmarks.run`` leaves (``<task>/<algorithm>/seed<k>/`` with ``csv/metrics.csv``,
``DONE.json`` and Hydra's ``.hydra/config.yaml``), and the sweep's own bookkeeping
(benchmarks/run.py): a failed run's recorded error, the pre-flight check of every run."""

from __future__ import annotations

import csv
import itertools
import json
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from benchmarks import report
from benchmarks.run import LOG, Run, compose_run_config, exception_message, execute

ROOT = Path(__file__).resolve().parents[1]
TASK = "count"
SEEDS = [0, 1, 2]
STEPS = 6
EVAL_STEPS = [0, 3, 6]
THRESHOLD = 0.5
# a GRPO-D-like beta schedule: drawn with a rolling mean it would read 0.070 -> 0.057 -> 0.061
BETA = [0.070, 0.043, 0.071, 0.050, 0.090, 0.060]
OFFSET = {"grpo": 0.0, "apo": 0.05}


def held_out(algo: str, seed: int, step: int) -> float:
    """eval/accuracy_sampled: highest at step 0 (before training), so "best" must skip it."""
    return {0: 0.9, 3: 0.4, 6: 0.6}[step] + 0.01 * seed + OFFSET.get(algo, 0.0)


def train_row(algo: str, seed: int, t: int) -> dict[str, float]:
    acc = 0.1 * t + 0.02 * seed + OFFSET.get(algo, 0.0)
    fmt = 0.5 + 0.05 * t
    w_fmt = 0.5 if algo == "apo" else 1.0
    return {
        "rl_step": t,
        "step": t - 1,
        "reward": acc + w_fmt * fmt,
        "rewards/total/mean": acc + w_fmt * fmt,
        "rewards/accuracy/mean": acc,
        "rewards/format/mean": fmt,
        "accuracy": acc,
        "kl": 0.01 * (t % 2) + 0.001 * seed,  # zig-zag: smoothed, it is not the raw series
        "beta": BETA[t - 1] + 0.001 * seed,
        "lr": 1e-6 * t,
        "entropy": 1.0 - 0.05 * t,
        "completions/mean_length": 20.0 + t + seed,
    }


def write_run(sweep: Path, algo: str, seed: int, overrides: list[str]) -> Path:
    d = sweep / TASK / algo / f"seed{seed}"
    (d / "csv").mkdir(parents=True)
    rows: list[dict] = []
    last_eval: dict = {}
    for t in range(0, STEPS + 1):
        if t in EVAL_STEPS:  # the held-out evaluation row ...
            last_eval = {
                "eval/step": t,
                "eval/accuracy": 0.8 - 0.01 * t,
                "eval/accuracy_sampled": held_out(algo, seed, t),
            }
            rows.append({"step": max(t - 1, 0), **last_eval})
        if t:  # ... and the training row, with the last evaluation forward-filled as a logger may
            rows.append({**train_row(algo, seed, t), **last_eval})
    cols = list(dict.fromkeys(k for r in rows for k in r))
    with open(d / "csv" / "metrics.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)
    command = [f"algorithm={algo}", f"seed={seed}", f"trainer.max_steps={STEPS}", *overrides, f"output_dir={d}"]
    (d / ".hydra").mkdir()
    OmegaConf.save(compose_run_config(command), d / ".hydra" / "config.yaml")  # as Hydra saves it
    (d / "DONE.json").write_text(
        json.dumps({"status": "done", "task": TASK, "algorithm": algo, "seed": seed, "wall_s": 1.0, "command": command})
    )
    return d


def make_sweep(tmp_path: Path, algorithm_overrides: dict[str, list[str]]) -> Path:
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    suite = {
        "name": "fixture",
        "algorithms": list(algorithm_overrides),
        "seeds": SEEDS,
        "steps": STEPS,
        "tasks": {TASK: []},
        "eval": {"every": 3, "metric": "eval/accuracy_sampled", "threshold": THRESHOLD},
        "logger": {"wandb": False},
    }
    (sweep / "suite.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(suite)))
    for algo, extra in algorithm_overrides.items():
        for seed in SEEDS:
            write_run(sweep, algo, seed, extra)
    return sweep


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """GRPO (accuracy + 1.0 format) and APO (reward=apo: accuracy + 0.5 format), 3 seeds each."""
    return make_sweep(tmp_path_factory.mktemp("fixture"), {"grpo": [], "apo": ["reward=apo"]})


@pytest.fixture(scope="module")
def plots(sweep):
    suite, runs = report.collect(sweep)
    out = report.plot_task(TASK, runs, ["grpo", "apo"], "eval/accuracy_sampled", sweep / "plots", keep_figures=True)
    yield {p.stem: p for p in out}
    import matplotlib.pyplot as plt

    plt.close("all")


def _lines(ax) -> dict[str, tuple[list, list]]:
    """{algorithm: (x, y)} of the lines drawn on an axis (the legend label is "<algo> (n=k)")."""
    return {ln.get_label().split(" (")[0]: (list(ln.get_xdata()), list(ln.get_ydata())) for ln in ax.get_lines()}


def _data(p: report.Plot) -> list[dict]:
    with open(p.data, newline="") as f:
        return list(csv.DictReader(f))


# ----------------------------------------------------------------------------- curves
def test_schedules_are_drawn_raw_and_batch_statistics_smoothed(plots):
    p = plots["kl_beta"]
    kl_ax, beta_ax = p.figure.axes[:2]
    for algo in ("grpo", "apo"):
        x, y = _lines(beta_ax)[algo]
        assert x == list(range(1, STEPS + 1))
        raw = [np.mean([BETA[t - 1] + 0.001 * s for s in SEEDS]) for t in x]
        assert y == pytest.approx(raw, abs=1e-12)  # every step's own value: no rolling mean
        kl = {t: np.mean([0.01 * (t % 2) + 0.001 * s for s in SEEDS]) for t in x}
        smoothed = [np.mean([kl[u] for u in x if t - report.SMOOTH < u <= t]) for t in x]
        assert _lines(kl_ax)[algo][1] == pytest.approx(smoothed, abs=1e-12)
    # the numbers beside the plot are the plotted ones, labelled with their smoothing
    rows = [r for r in _data(p) if r["metric"] == "beta/effective|beta" and r["algorithm"] == "apo"]
    assert [float(r["mean"]) for r in rows] == pytest.approx(_lines(beta_ax)["apo"][1])
    assert {r["smoothing"] for r in rows} == {"none"}
    assert {r["smoothing"] for r in _data(p) if r["metric"] == "kl"} == {f"rolling_mean_{report.SMOOTH}"}
    # the caption says which curve is smoothed and how
    assert f"KL to reference (per token): trailing rolling mean over {report.SMOOTH} RL steps" in p.caption
    assert "KL weight β (APO: mean β_i): none (raw values)" in p.caption
    lr_x, lr_y = _lines(plots["lr"].figure.axes[0])["grpo"]
    assert lr_y == pytest.approx([1e-6 * t for t in lr_x])
    assert "none (raw values)" in plots["lr"].caption


def test_accuracy_is_plotted_per_reward_component(plots):
    p = plots["reward"]
    assert [ax.get_ylabel() for ax in p.figure.axes] == ["accuracy reward", "format reward"]
    assert {r["metric"] for r in _data(p)} == {"rewards/accuracy/mean", "rewards/format/mean"}  # keys in the CSV
    x, y = _lines(p.figure.axes[0])["apo"]
    raw = {t: np.mean([0.1 * t + 0.02 * s + OFFSET.get("apo", 0.0) for s in SEEDS]) for t in x}
    assert y == pytest.approx([np.mean([raw[u] for u in x if t - report.SMOOTH < u <= t]) for t in x])
    assert "WEIGHTS DIFFER" not in p.title  # unweighted scores: comparable


def test_total_reward_title_says_the_weights_differ(plots, tmp_path):
    title = plots["reward_total"].title
    assert "WEIGHTS DIFFER" in title, title
    assert "grpo: 1 accuracy + 1 format" in title and "apo: 1 accuracy + 0.5 format" in title
    assert title in plots["reward_total"].caption and "totals are not comparable" in plots["reward_total"].caption
    assert title.split(" — ")[0] in plots["reward_total"].figure.get_suptitle()
    # the same weights: the title states them once, no warning
    same = make_sweep(tmp_path, {"grpo": [], "dr_grpo": []})
    _, runs = report.collect(same)
    out = {p.stem: p for p in report.plot_task(TASK, runs, ["grpo", "dr_grpo"], "eval/accuracy", same / "plots")}
    assert "WEIGHTS DIFFER" not in out["reward_total"].title
    assert out["reward_total"].title.endswith("= 1 accuracy + 1 format for every algorithm")


def test_lines_of_different_algorithms_are_distinguishable(plots):
    for p in plots.values():
        for ax in p.figure.axes:
            lines = ax.get_lines()
            styles = {(ln.get_color(), str(ln.get_linestyle()), ln.get_marker()) for ln in lines}
            assert len(styles) == len(lines)
            assert len({ln.get_linestyle() for ln in lines}) == len(lines)  # apart in black and white too
            assert len({ln.get_marker() for ln in lines}) == len(lines)
            # a curve drawn over another is thinner with smaller markers: where they coincide both show
            sizes = [(ln.get_linewidth(), ln.get_markersize()) for ln in sorted(lines, key=lambda ln: ln.get_zorder())]
            assert all(a[0] > b[0] and a[1] > b[1] for a, b in zip(sizes, sizes[1:]))


# ----------------------------------------------------------------------------- statistics
def test_best_and_steps_to_threshold_exclude_step_0(sweep):
    for seed in SEEDS:
        s = report.summarize_run(sweep / TASK / "grpo" / f"seed{seed}", "eval/accuracy_sampled", THRESHOLD)
        assert s["initial"]["eval/accuracy_sampled"] == pytest.approx(0.9 + 0.01 * seed)  # step 0: the highest
        assert s["best"] == pytest.approx(held_out("grpo", seed, 6))
        assert s["best_step"] == 6
        # step 0 (0.9) is already above the threshold (0.5): no training step reached it, and
        # the dip to 0.4 and back to 0.6 is not "6 steps to threshold"
        assert s["steps_to_threshold"] is None and s["threshold_at_start"] is True
        assert s["eval_steps"] == EVAL_STEPS  # the forward-filled rows are not evaluations
    rows = report.table_rows(report.collect(sweep)[1], ["grpo"], "eval/accuracy_sampled", THRESHOLD)
    best = [held_out("grpo", s, 6) for s in SEEDS]
    assert rows[0][5] == f"{np.mean(best):.3f} ± {np.std(best, ddof=1):.3f}"
    assert rows[0][6] == "at step 0 already (3/3)"


def test_bootstrap_interval_matches_a_hand_computation():
    x = np.array([[0.2, 1.0, 5.0], [0.5, 1.0, 3.0], [0.6, 2.0, 4.0], [0.9, 4.0, 0.0]])  # 4 seeds x 3 steps
    lo, hi = report.bootstrap_ci(x, level=0.9, n_boot=500, seed=7)
    # (1) the same resampling by hand: torch's generator seeded alike, 500 times n of n seeds with
    # replacement, the mean of each resample, its 5% and 95% quantiles
    torch.manual_seed(7)
    t = torch.tensor(x)
    means = torch.stack([t[torch.multinomial(torch.ones(4), 4, replacement=True)].mean(0) for _ in range(500)])
    assert lo == pytest.approx(np.quantile(means.numpy(), 0.05, axis=0), abs=1e-12)
    assert hi == pytest.approx(np.quantile(means.numpy(), 0.95, axis=0), abs=1e-12)
    # (2) against the exact bootstrap distribution (all 4^4 equally likely resamples): the bounds
    # are its 5% and 95% quantiles up to the Monte-Carlo error of 2000 resamples
    lo, hi = report.bootstrap_ci(x, level=0.9, n_boot=2000, seed=0)
    exact = np.array([x[list(idx)].mean(0) for idx in itertools.product(range(4), repeat=4)])
    eps = 4 * np.sqrt(0.05 * 0.95 / 2000)
    for bound, q in ((lo, 0.05), (hi, 0.95)):
        assert np.all((exact < bound - 1e-12).mean(0) <= q + eps), (bound, q)
        assert np.all((exact <= bound + 1e-12).mean(0) >= q - eps), (bound, q)
    with pytest.raises(ValueError, match="n_seeds >= 2"):
        report.bootstrap_ci(x[:1])


def test_plotted_band_is_the_bootstrap_interval_over_seeds(plots):
    p = plots["accuracy"]
    ax = p.figure.axes[0]
    assert ax.get_ylabel() == "held-out accuracy (sampled)"
    per_seed = np.array([[held_out("apo", s, t) for t in EVAL_STEPS] for s in SEEDS])
    lo, hi = report.bootstrap_ci(per_seed)
    rows = [r for r in _data(p) if r["metric"] == "eval/accuracy_sampled" and r["algorithm"] == "apo"]
    assert [int(r["step"]) for r in rows] == EVAL_STEPS
    assert [float(r["ci_low"]) for r in rows] == pytest.approx(lo, abs=1e-12)
    assert [float(r["ci_high"]) for r in rows] == pytest.approx(hi, abs=1e-12)
    band = ax.collections[1]  # the bands of grpo, then apo
    verts = band.get_paths()[0].vertices
    for step, a, b in zip(EVAL_STEPS, lo, hi):
        ys = verts[np.isclose(verts[:, 0], step), 1]
        assert ys.min() == pytest.approx(a) and ys.max() == pytest.approx(b)
    assert "n = 3 seeds per algorithm" in p.caption
    assert "95% percentile-bootstrap confidence interval" in p.caption and "BootStrapper" in p.caption
    assert {ln.get_label() for ln in ax.get_lines()} == {"grpo (n=3)", "apo (n=3)"}
    assert [t.get_text() for t in p.figure.legends[0].get_texts()] == ["grpo (n=3)", "apo (n=3)"]


# ----------------------------------------------------------------------------- files
def test_figures_are_png_and_pdf_at_paper_size(plots):
    from PIL import Image

    assert set(plots) == {"accuracy", "reward", "reward_total", "kl_beta", "lr", "entropy", "length"}
    for p in plots.values():
        assert p.pdf.read_bytes()[:5] == b"%PDF-"
        im = Image.open(p.png)
        assert im.info["dpi"] == pytest.approx((report.DPI, report.DPI), abs=0.01)
        w, h = p.figure.get_size_inches()
        assert w in (report.COLUMN_W, report.FULL_W) and im.size == (round(w * report.DPI), round(h * report.DPI))
    assert Image.open(plots["lr"].png).size == (1050, 780)  # one column: 3.5 x 2.6 in at 300 dpi
    assert Image.open(plots["kl_beta"].png).size == (2100, 780)  # two panels: the full 7 in


def test_report_lists_each_algorithms_recipe(sweep):
    md = report.write_report(sweep, wandb_log=False).read_text()
    recipe = md.split("### Recipes", 1)[1].split("![", 1)[0]
    rows = {
        ln.split("|")[1].strip(): [c.strip() for c in ln.split("|")[2:-1]]
        for ln in recipe.splitlines()
        if ln.startswith("| `")
    }
    assert rows["`reward.components.format.weight`"] == ["`1.0`", "`0.5`"]
    assert rows["`algorithm.name`"] == ["`grpo`", "`apo`"]
    assert not any(k.strip("`") in ("seed", "output_dir", "logger.name") for k in rows)
    assert "`grpo` = 1 accuracy + 1 format" in recipe and "`apo` = 1 accuracy + 0.5 format" in recipe
    for stem in ("kl_beta", "reward_total"):
        assert f"plots/{TASK}_{stem}.png" in md and f"plots/{TASK}_{stem}.pdf" in md
        assert (sweep / "plots" / f"{TASK}_{stem}.pdf").exists()
    assert "not a confidence interval" in md and "best eval/accuracy_sampled (steps ≥ 1)" in md
    # only keys that apply: GRPO's STCR is off (its lam is n/a), neither run's constant KL schedule
    # takes GRPO-D's beta_min / beta_max (left out, though their stored defaults differ)
    assert rows["`algorithm.stcr.enabled`"] == ["`False`", "`True`"]
    assert rows["`algorithm.stcr.lam`"] == ["n/a", "`1.00001`"]
    assert rows["`algorithm.dads.enabled`"] == ["n/a", "`True`"]
    assert not any("schedule.beta_" in k or "explore_frac" in k for k in rows), sorted(rows)


def test_recipe_keys_apply_by_section_switch_and_schedule():
    flat = report.flatten(
        OmegaConf.to_container(compose_run_config(["algorithm=grpo_d_counting", "output_dir=/tmp/x"]), resolve=True)
    )
    applies = {k for k in flat if report.key_applies(flat, k)}
    # GRPO-D's schedule takes beta_min, beta_max and explore_frac, not the constant's coef
    assert {"algorithm.kl.schedule.beta_min", "algorithm.kl.schedule.beta_max"} <= applies
    assert "algorithm.kl.coef" not in applies and "algorithm.kl.schedule.name" in applies
    # switched-off sections: only their switch applies
    assert "algorithm.stcr.enabled" in applies and "algorithm.stcr.lam" not in applies
    assert "algorithm.filter_groups.max_extra_rounds" not in applies
    # a constant learning rate has no floor
    assert flat["optim.scheduler"] == "constant" and "optim.min_lr_ratio" not in applies
    assert "optim.min_lr_ratio" in {k for k in flat if report.key_applies({**flat, "optim.scheduler": "cosine"}, k)}


# ----------------------------------------------------------------------------- the results table
def _summary_runs(rows: dict[int, tuple[float, float]], threshold: float | None) -> list[dict]:
    """Finished runs of algorithm "a" as table_rows reads them: seed -> (step 0, final) of the metric."""
    out = []
    for seed, (start, end) in rows.items():
        d = {"eval/accuracy_sampled": start}
        e = {"eval/accuracy_sampled": end}
        at_start = threshold is not None and start >= threshold
        out.append(
            {
                "algorithm": "a",
                "seed": seed,
                "status": "done",
                "summary": {
                    "initial": d,
                    "final": e,
                    "best": end,
                    "change": end - start,
                    "threshold_at_start": at_start,
                    "steps_to_threshold": None if at_start or threshold is None or end < threshold else 6,
                },
            }
        )
    return out


def test_change_from_step_0_has_a_bootstrap_interval_over_seeds():
    starts_ends = {0: (0.2, 0.5), 1: (0.3, 0.4), 2: (0.25, 0.65), 3: (0.1, 0.3)}
    rows = report.table_rows(_summary_runs(starts_ends, None), ["a"], "eval/accuracy_sampled", None)
    cols = report.table_columns("eval/accuracy_sampled", None)
    cell = rows[0][cols.index("change final − step 0 [95% CI]")]
    diffs = np.array([e - s for s, e in starts_ends.values()])  # 0.3, 0.1, 0.4, 0.2
    # the interval by hand: torch's generator seeded as the report seeds it, N_BOOT resamples of
    # the 4 seeds with replacement, the 2.5% and 97.5% quantiles of the resampled means
    torch.manual_seed(report.BOOT_SEED)
    t = torch.tensor(diffs)
    means = torch.stack(
        [t[torch.multinomial(torch.ones(4), 4, replacement=True)].mean() for _ in range(report.N_BOOT)]
    ).numpy()
    lo, hi = np.quantile(means, [0.025, 0.975])
    assert cell == f"{diffs.mean():+.3f} [{lo:+.3f}, {hi:+.3f}]"
    assert cell.startswith("+0.250 [")
    # one seed: the change alone; step 0 missing: no change
    one = report.table_rows(_summary_runs({0: (0.5, 0.25)}, None), ["a"], "eval/accuracy_sampled", None)
    assert one[0][4] == "-0.250"


def test_steps_to_threshold_are_counted_only_for_runs_below_it_at_step_0(tmp_path):
    d = tmp_path / "run"
    (d / "csv").mkdir(parents=True)
    rows = [
        {"step": 0, "eval/step": 0, "eval/accuracy": 0.3},
        *({"rl_step": s, "step": s - 1, "reward": 1.0} for s in range(1, 7)),
        {"step": 2, "eval/step": 3, "eval/accuracy": 0.5},
        {"step": 5, "eval/step": 6, "eval/accuracy": 0.7},
    ]
    cols = list(dict.fromkeys(k for r in rows for k in r))
    with open(d / "csv" / "metrics.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)
    for threshold, steps, at_start in ((0.45, 3, False), (0.7, 6, False), (0.8, None, False), (0.3, None, True)):
        s = report.summarize_run(d, "eval/accuracy", threshold)
        assert (s["steps_to_threshold"], s["threshold_at_start"]) == (steps, at_start), threshold
        assert s["change"] == pytest.approx(0.4)
    # a table of runs that started below (one reached it) and one that started above it
    runs = _summary_runs({0: (0.2, 0.6), 1: (0.3, 0.4), 2: (0.7, 0.8)}, 0.5)
    cell = report.table_rows(runs, ["a"], "eval/accuracy_sampled", 0.5)[0][6]
    assert cell == "6 (1/2); at step 0 already: 1/3"


# ----------------------------------------------------------------------------- figures for a paper
def _set_lr(sweep: Path, lr) -> None:
    """Rewrite every run's lr column: ``lr(seed, rl_step)``."""
    for m in sweep.glob(f"{TASK}/*/seed*/csv/metrics.csv"):
        seed = int(m.parent.parent.name[4:])
        with open(m, newline="") as f:
            rows = list(csv.DictReader(f))
        for r in rows:
            if r.get("lr"):
                r["lr"] = repr(lr(seed, int(float(r["rl_step"]))))
        with open(m, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)


def test_a_constant_is_stated_not_plotted(tmp_path):
    sweep = make_sweep(tmp_path, {"grpo": [], "apo": ["reward=apo"]})
    md = report.write_report(sweep, wandb_log=False).read_text()
    assert (sweep / "plots" / f"{TASK}_lr.png").exists()  # 1e-6 x step: a schedule, drawn
    _set_lr(sweep, lambda seed, step: 2.85e-4)
    md = report.write_report(sweep, wandb_log=False).read_text()
    assert not (sweep / "plots" / f"{TASK}_lr.png").exists() and f"{TASK}_lr.png" not in md
    assert not (sweep / "plots" / f"{TASK}_lr.pdf").exists()  # the earlier report's figure is gone too
    assert "Constant over training in every run (not plotted): learning rate: 0.000285 for every algorithm" in md
    # a flat mean of seeds that move (one up, one down): not a constant, drawn with its band
    _set_lr(sweep, lambda seed, step: 2.85e-4 + (seed - 1) * 1e-6 * step)
    md = report.write_report(sweep, wandb_log=False).read_text()
    assert (sweep / "plots" / f"{TASK}_lr.png").exists() and "learning rate: 0.000285" not in md


def test_figures_read_like_a_paper(plots):
    """Human-readable axis labels and tick labels, the legend outside every axis, "bootstrap CI"
    only where a band is drawn."""
    for p in plots.values():
        fig = p.figure
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        boxes = [ax.get_window_extent(renderer) for ax in fig.axes if ax.get_visible()]
        (legend,) = fig.legends
        lb = legend.get_window_extent(renderer)
        assert not any(lb.overlaps(b) for b in boxes), p.stem  # never over a curve
        for ax in fig.axes:
            if not ax.get_visible():
                continue
            assert "/" not in ax.get_ylabel() and "_" not in ax.get_ylabel().replace("β_i", ""), ax.get_ylabel()
            ticks = [t.get_text().replace("$\\mathdefault{", "").replace("}$", "") for t in ax.get_yticklabels()]
            assert all(len(x.lstrip("−-")) <= 5 for x in ticks if x), (p.stem, ticks)
    lr_ax = plots["lr"].figure.axes[0]
    assert "10^{" in lr_ax.yaxis.get_offset_text().get_text()  # 1e-6 .. 6e-6 read as 1..6 ×10⁻⁶
    # the learning rate is the same in every seed: no band, and the figure does not claim one
    assert "bootstrap CI" not in plots["lr"].figure.get_suptitle()
    assert "no band: every seed has the same values" in plots["lr"].caption
    assert not plots["lr"].figure.axes[0].collections
    assert "bootstrap CI" in plots["accuracy"].figure.get_suptitle()


def test_plotting_logs_nothing_below_warning(sweep, tmp_path, caplog):
    """matplotlib's PDF backend subsets fonts with fontTools, which logs every table at INFO:
    hundreds of lines in a sweep's console (Hydra sets the root logger to INFO)."""
    import logging

    caplog.set_level(logging.INFO)
    _, runs = report.collect(sweep)
    report.plot_task(TASK, runs, ["grpo", "apo"], "eval/accuracy_sampled", tmp_path / "plots")
    assert list((tmp_path / "plots").glob("*.pdf"))
    noise = [r for r in caplog.records if r.name.split(".")[0] in ("fontTools", "matplotlib")]
    assert not noise, [f"{r.name}: {r.getMessage()}" for r in noise[:3]]


def test_each_report_logs_to_the_one_wandb_run_of_its_sweep(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    sweep = make_sweep(tmp_path, {"grpo": []})
    for _ in range(2):
        report.write_report(sweep, wandb_log=True)
    runs = sorted((sweep / "wandb").glob("offline-run-*"))
    assert len(runs) == 2, runs  # two reports ...
    rid = (sweep / report.WANDB_ID_FILE).read_text().strip()
    assert {r.name.rsplit("-", 1)[1] for r in runs} == {rid}  # ... into one W&B run (wandb sync resumes it)


# ----------------------------------------------------------------------------- failed runs
def _execute(sweep: Path, algo: str, command: list[str]) -> tuple[Run, dict]:
    run = Run(TASK, algo, 0, sweep / TASK / algo / "seed0", command)
    execute(run, {"eval": {}}, rerun_failed=True, print_lock=threading.Lock())
    return run, json.loads((run.run_dir / "FAILED.json").read_text())


def test_a_failed_run_records_its_own_error_and_its_console_log(tmp_path):
    sweep = make_sweep(tmp_path, {"grpo": []})
    # a bug: the exception line of its traceback
    run, failed = _execute(sweep, "crash", [sys.executable, "-c", "raise RuntimeError('reward worker died: exit 7')"])
    assert run.status == "failed" and failed["error"] == "RuntimeError: reward worker died: exit 7"
    assert failed["log"] == str(run.run_dir / LOG) and "Traceback" in Path(failed["log"]).read_text()
    # a user error of framework.run: its `error:` line, the same message check_early raises here
    bad = ["algorithm=grpo", "algorithm.clip_low=-1", f"output_dir={tmp_path / 'o'}", f"hydra.run.dir={tmp_path / 'o'}"]
    from framework.train import check_early

    with pytest.raises(Exception) as e:
        check_early(compose_run_config(bad))
    _, failed = _execute(sweep, "user_error", [sys.executable, "-m", "framework.run", *bad])
    assert failed["error"] == exception_message(e.value) and "clip_low" in failed["error"]
    # Hydra cannot compose the config: its message, not its config search path
    bad = ["algorithm=does_not_exist", f"hydra.run.dir={tmp_path / 'h'}"]
    with pytest.raises(Exception) as e:
        compose_run_config(bad)
    _, failed = _execute(sweep, "no_such_algorithm", [sys.executable, "-m", "framework.run", *bad])
    from framework.errors import one_line
    from framework.overrides import composition_error

    # the run's own `error:` line: the CLI's one line for Hydra's exception (framework.run.run_cli)
    assert failed["error"] == one_line(composition_error(e.value, bad, "config"))
    assert failed["error"].startswith("no config 'algorithm/does_not_exist'; options of algorithm: apo")
    assert "search path" not in failed["error"] and "provider=" not in failed["error"]
    # the report shows each error and links its console.log
    md = report.write_report(sweep, wandb_log=False).read_text()
    assert (
        "- `crash` seed 0 (failed): RuntimeError: reward worker died: exit 7 — its output: "
        f"[`{TASK}/crash/seed0/console.log`]({TASK}/crash/seed0/console.log)" in md
    )
    assert "no config 'algorithm/does_not_exist'" in md


@pytest.mark.parametrize(
    "log_text, expected",
    [
        (
            "$ python -m framework.run x=1\nsome output\nerror: data.path=/x does not exist\n(set APO_RL_DEBUG=1 ...)\n",
            "data.path=/x does not exist",
        ),
        (
            "Error executing job with overrides: ['a=1']\nTraceback (most recent call last):\n  File \"x.py\", line 1\n"
            "    raise KeyError('k')\n    ^^^^^\nKeyError: 'k'\n\nSet the environment variable HYDRA_FULL_ERROR=1 for a "
            "complete stack trace.\n",
            "KeyError: 'k'",
        ),
        (
            "$ cmd\nCould not override 'trainer.foo'.\nTo append to your config use +trainer.foo=2\nKey 'foo' is not in "
            "struct\n    full_key: trainer.foo\n    object_type=dict\n\nSet the environment variable HYDRA_FULL_ERROR=1 "
            "for a complete stack trace.\n",
            "Could not override 'trainer.foo'. To append to your config use +trainer.foo=2 Key 'foo' is not in struct "
            "full_key: trainer.foo object_type=dict",
        ),
    ],
)
def test_error_message_of_a_console_log(log_text, expected):
    from benchmarks.run import error_message

    assert error_message(log_text) == expected


# ----------------------------------------------------------------------------- pre-flight
def test_a_sweep_checks_every_run_before_starting_any(tmp_path):
    sweep = tmp_path / "sweep"
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.run",
            "suite=smoke",
            f"sweep_dir={sweep}",
            "suite.seeds=[0]",
            "suite.algorithms=[grpo,no_such_algo]",
            "suite.algorithm_overrides={}",
            'suite.tasks.count=["data=synthetic"]',
            '+suite.tasks.bad=["data=synthetic","algorithm.clip_low=-1"]',
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 2, p.stdout + p.stderr
    err = [ln for ln in p.stderr.splitlines() if ln.startswith("error: ")]
    assert len(err) == 1, p.stderr
    assert "3 of 4 runs cannot start" in err[0] and "no run was started" in err[0]
    assert (
        "count/no_such_algo/seed0, bad/no_such_algo/seed0: In 'config': Could not find 'algorithm/no_such_algo'"
        in err[0]
    )
    assert "bad/grpo/seed0: invalid value algorithm.clip_low=-1.0" in err[0]
    assert "count/grpo/seed0" not in err[0]
    assert not list(sweep.glob("*/*/seed*")) and not (sweep / "suite.yaml").exists()  # nothing started
