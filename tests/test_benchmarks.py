"""Benchmark suites: the evaluator's metrics, the benchmark loaders on fixtures in each real
schema, a shortened `smoke` suite (report, plots, a failing run, re-running skips finished
runs, W&B group) and `python -m benchmarks.evaluate` on a checkpoint the suite saved."""

from __future__ import annotations

import itertools
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = str(ROOT / "configs")
FIX = ROOT / "tests" / "fixtures" / "benchmarks"


# ----------------------------------------------------------------------------- pass@k
def test_pass_at_k_matches_combinatorics_and_enumeration():
    from framework.evaluation import pass_at_k

    for n in range(1, 7):
        for c in range(n + 1):
            for k in range(1, n + 1):
                direct = 1 - math.comb(n - c, k) / math.comb(n, k)
                # enumerate every k-subset of n samples (c of them correct): P(at least one correct)
                subsets = list(itertools.combinations(range(n), k))
                enum = sum(any(i < c for i in s) for s in subsets) / len(subsets)
                assert pass_at_k(n, c, k) == pytest.approx(direct, abs=1e-12)
                assert pass_at_k(n, c, k) == pytest.approx(enum, abs=1e-12)
    assert pass_at_k(4, 2, 2) == pytest.approx(5 / 6)
    with pytest.raises(ValueError):
        pass_at_k(4, 1, 5)


# ----------------------------------------------------------------------------- evaluator
class ScriptedEngine:
    """Returns fixed completions per record id: ``greedy`` at temperature 0, else ``sampled``."""

    def __init__(self, bundle, script):
        self.bundle, self.script, self.calls = bundle, script, []

    def generate(self, prompts, n, sampling):
        from framework.rollout.base import Generation
        from framework.rollout.inputs import completion_mask

        greedy = sampling.temperature == 0
        self.calls.append((len(prompts.records), n, greedy))
        texts = []
        for r in prompts.records:
            out = [self.script[r["id"]]["greedy"]] if greedy else self.script[r["id"]]["sampled"]
            assert len(out) == n
            texts += out
        tok = self.bundle.tokenizer
        eos = self.bundle.eos_token_ids[0]
        seqs = [tok(t, add_special_tokens=False)["input_ids"] + [eos] for t in texts]
        T = max(map(len, seqs))
        ids = torch.tensor([s + [self.bundle.pad_token_id] * (T - len(s)) for s in seqs])
        mask, truncated = completion_mask(ids, self.bundle.eos_token_ids)
        return Generation(completion_ids=ids, completion_mask=mask, truncated=truncated)


def _fmt(ans):
    return f"<think>I count.</think><answer>{ans}</answer>"


@pytest.mark.parametrize("batch_size", [1, 2])
def test_evaluator_metrics_on_scripted_completions(vl_bundle, batch_size):
    from framework.evaluation import EvalSettings, Evaluator, pass_at_k
    from framework.rollout.base import SamplingParams
    from rewards import RewardSet

    records = [
        {"id": "a", "question": "How many?", "answer": "3", "images": [], "choices": []},
        {"id": "b", "question": "How many?", "answer": "5", "images": [], "choices": []},
    ]
    script = {
        "a": {"greedy": _fmt(3), "sampled": [_fmt(3), _fmt(4), _fmt(3), "3"]},  # 2 of 4 correct
        "b": {"greedy": _fmt("seven, maybe six"), "sampled": [_fmt(4), _fmt(6), "no", _fmt(1)]},  # 0 of 4
    }
    engine = ScriptedEngine(vl_bundle, script)
    rewards = RewardSet({"accuracy": {"weight": 1.0, "workers": 0}, "format": {"weight": 1.0}})
    settings = EvalSettings(
        greedy=SamplingParams(temperature=0.0),
        sampled=SamplingParams(temperature=1.0),
        pass_k=2,
        num_samples=4,
        batch_size=batch_size,
    )
    out = Evaluator(engine, vl_bundle, rewards, {"system_prompt": None}, settings).run(records)
    rewards.close()
    length = lambda t: len(vl_bundle.tokenizer(t, add_special_tokens=False)["input_ids"]) + 1  # noqa: E731 (+ EOS)
    assert out["eval/accuracy"] == pytest.approx(0.5)
    assert out["eval/format"] == pytest.approx(1.0)
    assert out["eval/accuracy_sampled"] == pytest.approx(2 / 8)
    assert out["eval/pass@k"] == pytest.approx((pass_at_k(4, 2, 2) + pass_at_k(4, 0, 2)) / 2)
    assert out["eval/pass@k"] == pytest.approx((1 - 1 / 6) / 2)
    la, lb = length(script["a"]["greedy"]), length(script["b"]["greedy"])
    assert out["eval/mean_length"] == pytest.approx((la + lb) / 2)
    assert out["eval/mean_length_correct"] == pytest.approx(la)
    assert out["eval/mean_length_incorrect"] == pytest.approx(lb)
    assert (2 // batch_size) * 2 == len(engine.calls)  # one sampled + one greedy call per batch


def test_eval_config_keys_are_validated():
    from framework.config import ConfigError, TrainerConfig, check_section

    t = check_section({"eval_pass_k": 4, "eval_samples": 8}, TrainerConfig, "trainer")
    assert (t.eval_pass_k, t.eval_samples) == (4, 8)
    with pytest.raises(ConfigError, match="eval_samples=2 must be >= trainer.eval_pass_k=4"):
        check_section({"eval_pass_k": 4, "eval_samples": 2}, TrainerConfig, "trainer")
    with pytest.raises(ConfigError, match="eval_pass_k"):
        check_section({"eval_pass_k": 0}, TrainerConfig, "trainer")


# ----------------------------------------------------------------------------- loaders
def _load(name, *overrides):
    from framework.data import load_data

    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        cfg = compose("config", overrides=[f"data={name}", *overrides])
    return load_data(cfg.data)


RED, GREEN, BLUE, YELLOW, GRAY = (220, 30, 30), (30, 160, 50), (30, 70, 220), (230, 200, 40), (128, 128, 128)

# benchmark -> (overrides pointing at the fixture, split, expected [(id or None, answer, choices, image colours,
#               question placeholder count, a substring of the question)])
LOADER_CASES = {
    "mathvista": (
        [f"data.hub_id={FIX}/mathvista"],
        "test",
        [
            ("1", "B", ["6", "8", "10"], [RED], 0, "Choices:\n(A) 6"),
            ("2", "1000", [], [GREEN], 0, "(Unit: g)"),
            ("3", "1.2", [], [BLUE], 0, "one decimal place"),
        ],
    ),
    "mathverse": (
        [f"data.hub_id={FIX}/mathverse"],
        "test",
        [
            ("1", "C", ["40°", "50°", "130°", "140°"], [RED], 0, "Find angle 2."),
            ("5", "C", [], [GREEN], 0, "question shown in the image"),
            ("6", "4\\pi", [], [BLUE], 0, "radius 2"),
        ],
    ),
    "mmk12": (
        [f"data.hub_id={FIX}/mmk12"],
        "test",
        [
            ("1b879781-05b3-4254-b1cf-34d64ffb3275", "3/4", [], [BLUE], 0, "ratio of the areas"),
            ("7c1f0e2a-0000-4000-8000-000000000001", "2.5", [], [YELLOW], 0, "incline"),
        ],
    ),
    "mmstar": (
        [f"data.hub_id={FIX}/mmstar"],
        "test",
        [
            (
                "0",
                "A",
                [
                    "The suitcase is on the book.",
                    "The suitcase is beneath the cat.",
                    "The suitcase is beneath the bed.",
                    "The suitcase is beneath the book.",
                ],
                [RED],
                0,
                "Options:",
            ),
            ("1", "B", ["red", "green", "blue", "yellow"], [GREEN], 0, "main color"),
        ],
    ),
    "mmmu": (
        [f"data.hub_id={FIX}/mmmu", "data.config_name=[Accounting,Math]"],
        "test",
        [
            (
                "validation_Accounting_1",
                "C",
                ["$1,000", "$2,000", "[image 3]", "$4,000"],
                [RED, GREEN, BLUE],
                3,
                "(C) <image>",
            ),
            ("validation_Math_1", "12", [], [YELLOW], 1, "<image>\nCompute the area"),
        ],
    ),
    "geometry3k": (
        [f"data.hub_id={FIX}/geometry3k"],
        "test",
        [("2401", "62", [], [GREEN], 1, "<image>Find the measure"), ("2402", "240.0", [], [BLUE], 1, "parallelogram")],
    ),
    "geoqa_r1v": (
        [f"data.hub_id={FIX}/geoqa_r1v", "data.splits={train:'train[:2]',test:'train[2:]'}"],
        "train",
        [(None, "40", [], [RED], 0, "angle A = 80°"), (None, "10", [], [GREEN], 0, "radius of circle O")],
    ),
    "geoqa": (
        [f"data.path={FIX}/geoqa"],
        "test",
        [(None, "35", [], [YELLOW], 0, "diameter of circle O"), (None, "10", [], [BLUE], 0, "rectangle ABCD")],
    ),
    "superclevr": (
        [f"data.path={FIX}/superclevr"],
        "test",
        [(None, "3", [], [RED], 0, "How many different items"), (None, "5", [], [GRAY], 0, "How many different items")],
    ),
}


@pytest.mark.parametrize("name", sorted(LOADER_CASES))
def test_benchmark_loader_on_fixture(name):
    from framework.data import FEATURES, to_record
    from framework.data.validation import validate_records

    overrides, split, expected = LOADER_CASES[name]
    ds = _load(name, *overrides)
    assert split in ds
    part = ds[split]
    assert part.features == FEATURES
    _, report = validate_records(part, split=split, on_invalid="error")
    assert report.invalid == 0
    recs = [to_record(part[i]) for i in range(len(part))]
    assert len(recs) == len(expected)
    for rec, (rid, answer, choices, colors, n_ph, text) in zip(recs, expected):
        if rid is not None:
            assert rec["id"] == rid
        assert rec["answer"] == answer, rec
        assert rec["choices"] == choices, rec
        assert [im.getpixel((0, 0)) for im in rec["images"]] == colors, rec["id"]
        assert rec["question"].count("<image>") == n_ph, rec["question"]
        assert text in rec["question"], rec["question"]
        assert rec["task"] == ("geoqa" if name == "geoqa_r1v" else name)
    if name == "mathvista":  # the choice text the answer was given as is kept
        assert recs[0]["metadata"]["answer_text"] == "8" and recs[0]["metadata"]["question_type"] == "multi_choice"


# ----------------------------------------------------------------------------- the smoke suite
ALGOS = ["grpo", "apo"]
SEEDS = [0, 1]
BROKEN = "grpo_d"  # a train split smaller than a batch: both of its runs fail once the data is loaded
# (a mistake only the data shows, so the sweep's pre-flight check of every config lets them start)


def _suite_cmd(sweep_dir: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "benchmarks.run",
        "suite=smoke",
        f"sweep_dir={sweep_dir}",
        "suite.steps=2",
        f"suite.seeds=[{','.join(map(str, SEEDS))}]",
        f"suite.algorithms=[{','.join(ALGOS + [BROKEN])}]",
        f'suite.algorithm_overrides.{BROKEN}=["algorithm=grpo_d_counting","data.train_size=2"]',
        'suite.tasks={count:["data=synthetic","data.kinds=[count]","data.train_size=48","data.test_size=8"]}',
        "suite.eval.size=4",
        "suite.eval.every=0",
        "suite.eval.samples=4",
        "suite.eval.pass_k=2",
        "suite.jobs=2",
        'suite.overrides=["trainer.prompts_per_step=4","rollout.group_size=4",'
        '"+reward.components.accuracy.workers=0","trainer.save_every=0"]',
        *extra,
    ]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    d = tmp_path_factory.mktemp("sweep") / "smoke-ci"
    p = subprocess.run(_suite_cmd(d), cwd=ROOT, capture_output=True, text=True, timeout=900)
    return d, p


def test_smoke_suite_report_rows_plots_and_failed_runs(sweep):
    d, p = sweep
    assert p.returncode == 1, p.stdout + p.stderr  # 1: a run failed (the broken one), the rest finished
    for algo in ALGOS:
        for seed in SEEDS:
            run = d / "count" / algo / f"seed{seed}"
            done = json.loads((run / "DONE.json").read_text())
            final = done["summary"]["final"]
            for k in ("eval/accuracy", "eval/accuracy_sampled", "eval/pass@k", "eval/format", "eval/mean_length"):
                assert k in final, (k, final)
            assert done["summary"]["eval_steps"][0] == 0 and done["summary"]["eval_steps"][-1] == 2
            assert (run / "checkpoints" / "step-000002" / "policy" / "config.json").exists()
            # logged to W&B offline, in the sweep's group, with the algorithm and seed in the config
            wb = list((run / "wandb").glob("offline-run-*/run-*.wandb"))
            assert wb, run
            blob = wb[0].read_bytes()
            assert b'"group":"smoke-ci"' in blob and f"count-{algo}-seed{seed}".encode() in blob
            assert f'{{"name":"{algo}"'.encode() in blob  # the algorithm section of the run config
            assert f'"{algo}","seed{seed}"'.encode() in blob  # tags: suite, task, algorithm, seed
    for seed in SEEDS:
        failed = json.loads((d / "count" / BROKEN / f"seed{seed}" / "FAILED.json").read_text())
        assert failed["error"] == "trainer.prompts_per_step=4 is larger than the train split (2 records)"
        assert failed["returncode"] == 2 and failed["log"].endswith(f"{BROKEN}/seed{seed}/console.log")
    assert "FAILED (" in p.stdout

    report = (d / "report.md").read_text()
    rows = [  # the results table (not the recipe table: "| key |" and its "| `<key>` |" rows)
        ln for ln in report.splitlines() if ln.startswith("| ") and not ln.startswith(("| algorithm", "| key", "| `"))
    ]
    assert [r.split("|")[1].strip() for r in rows] == ALGOS + [BROKEN]
    for r in rows:
        cells = [c.strip() for c in r.strip("|").split("|")]
        if cells[0] == BROKEN:
            assert cells[1] == "0/2"
        else:
            assert cells[1] == "2/2" and "±" in cells[3]  # final accuracy: mean ± std over 2 seeds
    assert f"`{BROKEN}` seed 0 (failed): trainer.prompts_per_step=4 is larger than the train split" in report

    from PIL import Image

    plots = sorted((d / "plots").glob("*.png"))
    assert [p.name for p in plots] == sorted(
        f"count_{s}.png" for s in ("accuracy", "reward", "reward_total", "kl_beta", "entropy", "length")
    )
    # the smoke suite's learning rate is constant: stated, not plotted
    assert "(not plotted): " in report and "learning rate: 0.0003 for every algorithm" in report
    # the console shows progress and results only: no third-party logging (fontTools subsetting
    # the PDFs' fonts wrote hundreds of [fontTools.subset][INFO] lines), nor in the sweep's run.log
    console = p.stdout + p.stderr
    assert "fontTools" not in console and "fontTools" not in (d / "run.log").read_text()
    assert all(ln.startswith(("benchmarks.run:", "[", "  ")) for ln in p.stdout.splitlines() if ln.strip()), p.stdout
    kept = (d / "console.log").read_text()
    assert all(ln in kept for ln in p.stdout.splitlines()), kept  # the console, also in <sweep>/console.log
    for png in plots:
        assert png.stat().st_size > 1024
        assert f"plots/{png.name}" in report and png.with_suffix(".pdf").exists()
        im = Image.open(png).convert("RGB")
        assert len(set(im.getdata())) > 10, png  # not one flat colour
    # the report itself logged to W&B as a run of the group
    assert list((d / "wandb").glob("offline-run-*/run-*.wandb"))


def test_rerunning_the_sweep_skips_finished_runs(sweep):
    d, _ = sweep
    markers = {p: p.stat().st_mtime_ns for p in d.glob("count/*/seed*/DONE.json")}
    assert len(markers) == len(ALGOS) * len(SEEDS)
    p = subprocess.run(_suite_cmd(d, "rerun_failed=false"), cwd=ROOT, capture_output=True, text=True, timeout=300)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("[")]
    assert sum("skipped (finished before)" in ln for ln in lines) == len(ALGOS) * len(SEEDS), p.stdout + p.stderr
    assert f"0 done, {len(ALGOS) * len(SEEDS)} skipped" in p.stdout
    assert {q: q.stat().st_mtime_ns for q in markers} == markers  # not run again
    assert (d / "report.md").exists()
    # the report regenerates on its own
    r = subprocess.run(
        [sys.executable, "-m", "benchmarks.report", str(d), "--no-wandb"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0 and "| grpo | 2/2 |" in r.stdout, r.stderr


def test_evaluate_cli_on_a_saved_checkpoint(sweep):
    d, _ = sweep
    ckpt = d / "count" / "grpo" / "seed0" / "checkpoints" / "step-000002"  # a step folder: its policy/ is used
    out = d / "eval" / "superclevr.json"
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.evaluate",
            f"checkpoint={ckpt}",
            "data=superclevr",
            f"data.path={FIX / 'superclevr'}",
            "pass_k=2",
            "num_samples=2",
            f"output={out}",
            "+reward.components.accuracy.workers=0",
            f"hydra.run.dir={d / 'eval'}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    printed = json.loads(p.stdout[p.stdout.index("{") :])
    assert printed["num_records"] == 2 and printed["model_path"].endswith("policy")
    for k in ("eval/accuracy", "eval/accuracy_sampled", "eval/pass@k", "eval/format", "eval/mean_length"):
        assert 0.0 <= printed["metrics"][k] <= (1.0 if "length" not in k else 1e6)
    assert json.loads(out.read_text())["metrics"] == printed["metrics"]


def test_evaluate_resolves_checkpoint_paths(tmp_path):
    from benchmarks.evaluate import resolve_checkpoint
    from framework.config import ConfigError
    from framework.models.loading import ModelNotFoundError

    step = tmp_path / "checkpoints" / "step-000010"
    (step / "policy").mkdir(parents=True)
    (step / "policy" / "config.json").write_text("{}")
    (step / "state.ckpt").write_text("")
    for given in (step, step / "policy", step / "state.ckpt"):
        assert resolve_checkpoint(str(given)) == str(step / "policy")
    with pytest.raises(ModelNotFoundError, match="/nonexistent/ckpt"):
        resolve_checkpoint("/nonexistent/ckpt")
    with pytest.raises(ConfigError, match="checkpoint is not set"):
        resolve_checkpoint("???")


def test_launcher_configs_extend_the_plugin_configs():
    """hydra/launcher=local_parallel|slurm extend the joblib / submitit_slurm plugins' configs
    (the plugins are an optional extra; composing them needs the plugins installed)."""
    import yaml

    for name, base in (("local_parallel", "joblib"), ("slurm", "submitit_slurm")):
        cfg = yaml.safe_load((ROOT / "configs" / "hydra" / "launcher" / f"{name}.yaml").read_text())
        assert cfg["defaults"] == [base]
    sweeps = (ROOT / "pyproject.toml").read_text()
    assert "hydra-joblib-launcher" in sweeps and "hydra-submitit-launcher" in sweeps


# ----------------------------------------------------------------------------- sweep bookkeeping
# A stand-in for `framework.run` (the sweep's bookkeeping is under test, not training): it writes
# what a run leaves (metrics, checkpoints with the real COMPLETE.json) and ends as its `+mode=`
# says. Its overrides are the command's arguments after the program, as benchmarks.run's are.
FAKE_RUN = r"""
import csv, json, os, signal, sys, time
from pathlib import Path

args = dict(a.split("=", 1) for a in sys.argv[1:] if "=" in a)
out = Path(args["output_dir"])
out.mkdir(parents=True, exist_ok=True)
steps, mode = int(args["trainer.max_steps"]), args["+mode"]
with open(out / "argv.jsonl", "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\n")


def metrics(upto):
    (out / "csv").mkdir(exist_ok=True)
    rows = [{"step": 0, "eval/step": 0, "eval/accuracy": 0.5}]
    rows += [{"rl_step": s, "step": s - 1, "reward": 1.0} for s in range(1, upto + 1)]
    if upto == steps:
        rows.append({"step": steps - 1, "eval/step": steps, "eval/accuracy": 0.75})
    with open(out / "csv" / "metrics.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["step", "rl_step", "reward", "eval/step", "eval/accuracy"])
        w.writeheader()
        w.writerows(rows)


def checkpoint(step, complete=True):
    from framework.checkpoint import write_marker

    d = out / "checkpoints" / f"step-{step:06d}"
    (d / "policy").mkdir(parents=True, exist_ok=True)
    (d / "policy" / "model.safetensors").write_bytes(b"w" * 64)
    (d / "state.ckpt").write_bytes(b"s" * 32)
    if complete:
        write_marker(d)


print("step 1/2  reward 0.500  acc 0.500", flush=True)  # progress lines: never the error
if "resume" in args:
    metrics(steps)
    checkpoint(steps)
elif mode == "ok":
    metrics(steps)
    checkpoint(steps)
elif mode.startswith("final_then_"):  # the final checkpoint written, then an exit status or a signal
    metrics(steps)
    checkpoint(steps)
    how = mode[len("final_then_"):]
    if how.isdigit():
        sys.exit(int(how))
    os.kill(os.getpid(), getattr(signal, how))
elif mode == "incomplete_then_75":  # preempted while writing its final checkpoint
    metrics(steps)
    checkpoint(steps, complete=False)
    print("apo-rl: preempted by SIGTERM after RL step 1", flush=True)
    sys.exit(75)
elif mode.startswith("kill_"):
    os.kill(os.getpid(), getattr(signal, mode[len("kill_"):]))
elif mode == "nothing_left":  # what training answers when asked to resume a finished run
    print("error: nothing left to train", flush=True)
    sys.exit(2)
elif mode == "wait_for_sigint":
    metrics(1)
    checkpoint(1)
    got = []

    def on_sigint(signum, frame):
        got.append(signum)
        with open(out / "sigint.log", "a") as f:
            f.write("SIGINT\n")

    signal.signal(signal.SIGINT, on_sigint)
    (out / "ready").write_text("1")
    while not got:
        time.sleep(0.05)
    time.sleep(1.5)  # a second, duplicate SIGINT would arrive now
    print("apo-rl: interrupted (Ctrl-C) after RL step 1", flush=True)
    sys.exit(130)
"""
FAKE_SUITE = {"eval": {"metric": "eval/accuracy"}}


def _fake_run(sweep: Path, algo: str, mode: str, steps: int = 2):
    from benchmarks.run import Run

    d = sweep / "count" / algo / "seed0"
    args = [f"algorithm={algo}", f"trainer.max_steps={steps}", f"+mode={mode}", f"output_dir={d}"]
    return Run("count", algo, 0, d, [sys.executable, "-c", FAKE_RUN, *args])


def _execute_fake(run, **kw):
    import threading

    from benchmarks.run import execute

    return execute(run, FAKE_SUITE, rerun_failed=True, print_lock=threading.Lock(), **kw)


def _json(p: Path) -> dict:
    return json.loads(p.read_text())


@pytest.mark.parametrize("sig", ["SIGSEGV", "SIGKILL"])
def test_a_run_killed_by_a_signal_is_reported_by_its_name(tmp_path, sig):
    run = _execute_fake(_fake_run(tmp_path, "crash", f"kill_{sig}"))
    failed = _json(run.run_dir / "FAILED.json")
    assert run.status == "failed" and failed["error"] == f"killed by {sig}", failed
    assert failed["returncode"] == -getattr(__import__("signal"), sig)
    assert "step 1/2" in (run.run_dir / "console.log").read_text()  # its last line, not its error


@pytest.mark.parametrize("mode", ["final_then_75", "final_then_143", "final_then_138", "final_then_SIGTERM"])
def test_a_run_with_a_complete_final_checkpoint_is_done_whatever_its_exit(tmp_path, mode):
    """Preempted during its final step (75), or signalled during the teardown after its final
    checkpoint (143 = SIGTERM, 138 = SIGUSR1, or killed by the signal): it trained to its end."""
    run = _execute_fake(_fake_run(tmp_path, "grpo", mode))
    assert run.status == "done", (run.status, run.error)
    done = _json(run.run_dir / "DONE.json")
    assert done["summary"]["final"]["eval/accuracy"] == 0.75 and done["summary"]["eval_steps"] == [0, 2]
    assert not (run.run_dir / "FAILED.json").exists() and not (run.run_dir / "INTERRUPTED.json").exists()
    # its final checkpoint's write interrupted: not finished, resumed by the next sweep
    run = _execute_fake(_fake_run(tmp_path / "b", "grpo", "incomplete_then_75"))
    assert run.status == "interrupted" and not (run.run_dir / "DONE.json").exists()
    assert _json(run.run_dir / "INTERRUPTED.json")["error"] == "apo-rl: preempted by SIGTERM after RL step 1"


def test_a_recorded_interruption_with_a_complete_final_checkpoint_is_not_run_again(tmp_path):
    """What an earlier sweep left for a run preempted in its final step: INTERRUPTED.json (or
    FAILED.json after "nothing left to train") beside a complete final checkpoint. The sweep
    records it as done; it neither resumes it (training would refuse) nor deletes it."""
    from framework.checkpoint import write_marker

    for marker in ("INTERRUPTED.json", "FAILED.json"):
        run = _fake_run(tmp_path / marker, "grpo", "nothing_left")
        d = run.run_dir
        ck = d / "checkpoints" / "step-000002"
        (ck / "policy").mkdir(parents=True)
        (ck / "policy" / "model.safetensors").write_bytes(b"w" * 64)
        write_marker(ck)
        (d / "csv").mkdir()
        (d / "csv" / "metrics.csv").write_text(
            "step,rl_step,reward,eval/step,eval/accuracy\n0,,,0,0.5\n0,1,1.0,,\n1,2,1.0,,\n1,,,2,0.75\n"
        )
        (d / marker).write_text(
            json.dumps({"status": marker[:-5].lower(), "returncode": 75, "command": run.command[3:]})
        )
        _execute_fake(run)
        assert run.status == "done", (marker, run.status, run.error)
        assert not (d / "argv.jsonl").exists()  # not run again
        assert _json(d / "DONE.json")["summary"]["final"]["eval/accuracy"] == 0.75 and not (d / marker).exists()
        assert check_complete_ok(ck)


def check_complete_ok(ck: Path) -> bool:
    from framework.checkpoint import check_complete

    return check_complete(ck) is None


def test_a_finished_run_is_never_deleted_when_its_command_changes(tmp_path):
    from benchmarks.run import decide

    first = _execute_fake(_fake_run(tmp_path, "grpo", "ok", steps=2))
    assert first.status == "done"
    before = (first.run_dir / "DONE.json").read_text()
    changed = _fake_run(tmp_path, "grpo", "ok", steps=3)  # the same folder, another trainer.max_steps
    dec = decide(changed, FAKE_SUITE)
    assert (dec.action, dec.why) == ("refuse", "trainer.max_steps 2 -> 3")
    _execute_fake(changed)  # (run_suite refuses before any run starts; execute never deletes it either)
    assert changed.status == "failed" and (first.run_dir / "DONE.json").read_text() == before
    # replace=true: run again, the finished folder kept beside it, renamed
    _execute_fake(_fake_run(tmp_path, "grpo", "ok", steps=3), replace=True)
    kept = list(first.run_dir.parent.glob("seed0.replaced-*"))
    assert len(kept) == 1 and (kept[0] / "DONE.json").read_text() == before
    assert (kept[0] / "checkpoints" / "step-000002" / "COMPLETE.json").exists()
    assert _json(first.run_dir / "DONE.json")["command"][1] == "trainer.max_steps=3"


DRIVER = r"""
import json, sys
from pathlib import Path
from benchmarks.run import Run, run_all

spec = json.loads(sys.argv[1])
runs = [Run("count", algo, 0, Path(d), cmd) for algo, d, cmd in spec]
run_all(runs, {"eval": {"metric": "eval/accuracy"}, "jobs": 1})
print(json.dumps([[r.name, r.status, r.error] for r in runs]))
"""


def test_ctrl_c_interrupts_the_running_run_once_and_the_next_sweep_resumes_it(tmp_path):
    import os
    import signal
    import time

    first = _fake_run(tmp_path, "first", "wait_for_sigint")
    second = _fake_run(tmp_path, "second", "ok")
    spec = json.dumps([[r.algorithm, str(r.run_dir), r.command] for r in (first, second)])
    # the sweep in its own process group, as a shell starts it: Ctrl-C signals that whole group
    p = subprocess.Popen(
        [sys.executable, "-c", DRIVER, spec],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    t0 = time.monotonic()
    while not (first.run_dir / "ready").exists():
        assert p.poll() is None and time.monotonic() - t0 < 300, p.communicate()
        time.sleep(0.1)
    os.killpg(p.pid, signal.SIGINT)  # the terminal's Ctrl-C
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err
    status = json.loads(out.strip().splitlines()[-1])
    assert status == [
        ["count/first/seed0", "interrupted", "interrupted by SIGINT (Ctrl-C) to the sweep"],
        ["count/second/seed0", "interrupted", "not started: SIGINT (Ctrl-C) to the sweep"],
    ], out
    # the run got the interrupt once (from the sweep), not also from the terminal: a second Ctrl-C
    # would tell it to stop at once, without its checkpoint
    assert (first.run_dir / "sigint.log").read_text() == "SIGINT\n"
    rec = _json(first.run_dir / "INTERRUPTED.json")
    assert rec["returncode"] == 130 and rec["command"] == first.command[3:]
    assert not (first.run_dir / "FAILED.json").exists() and not second.run_dir.exists()
    assert "SIGINT (Ctrl-C): passing it on to the running run(s)" in err
    # the same sweep again: the interrupted run resumes from its checkpoint, the other one runs
    again = subprocess.run([sys.executable, "-c", DRIVER, spec], capture_output=True, text=True, timeout=300)
    assert [s[1] for s in json.loads(again.stdout.strip().splitlines()[-1])] == ["done", "done"], again.stderr
    assert "count/first/seed0: interrupted before; resuming it from its last checkpoint" in again.stdout
    argv = [json.loads(ln) for ln in (first.run_dir / "argv.jsonl").read_text().splitlines()]
    assert len(argv) == 2 and argv[1] == [*first.command[3:], f"resume={first.run_dir}"]


def _sweep_args(sweep: Path, *extra: str) -> list[str]:
    return [
        "suite=smoke",
        f"sweep_dir={sweep}",
        "suite.steps=2",
        "suite.seeds=[0]",
        "suite.algorithms=[grpo,apo]",
        "report=false",
        *extra,
    ]


def test_a_sweep_refuses_to_replace_a_finished_run_run_with_other_settings(tmp_path):
    from benchmarks.run import plan, suite_dict

    sweep = tmp_path / "sweep"
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        runs = plan(suite_dict(compose("benchmark", overrides=_sweep_args(sweep))), sweep)
    # count/grpo/seed0 finished in an earlier sweep with suite.steps=4
    grpo = runs[0]
    old = [a.replace("trainer.max_steps=2", "trainer.max_steps=4") for a in grpo.command[3:]]
    grpo.run_dir.mkdir(parents=True)
    (grpo.run_dir / "DONE.json").write_text(json.dumps({"status": "done", "command": old, "summary": {}}))
    (grpo.run_dir / "result.bin").write_bytes(b"r")
    cmd = [sys.executable, "-m", "benchmarks.run", *_sweep_args(sweep)]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2, p.stdout + p.stderr
    err = [ln for ln in p.stderr.splitlines() if ln.startswith("error: ")]
    assert len(err) == 1 and "Traceback" not in p.stderr, p.stderr
    assert "count/grpo/seed0 (trainer.max_steps 4 -> 2)" in err[0] and "replace=true" in err[0], err[0]
    assert (grpo.run_dir / "result.bin").exists() and _json(grpo.run_dir / "DONE.json")["command"] == old
    assert not runs[1].run_dir.exists()  # nothing started
    # dry_run says what would happen to every run
    dry = subprocess.run([*cmd, "dry_run=true"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert dry.returncode == 0, dry.stderr
    assert "[1/2] count/grpo/seed0: REFUSED: finished with another command (trainer.max_steps 4 -> 2)" in dry.stdout
    assert "[2/2] count/apo/seed0: would run" in dry.stdout and "benchmarks.run: warning: 1 finished run" in dry.stdout
    assert sum(" -m framework.run " in ln for ln in dry.stdout.splitlines()) == 2
    replace = subprocess.run(
        [*cmd, "dry_run=true", "replace=true"], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert "count/grpo/seed0: would run again with the new command (replace=true" in replace.stdout, replace.stdout


@pytest.mark.slow
def test_ctrl_c_on_a_real_sweep_records_the_run_interrupted_and_resumes_it(tmp_path):
    import csv
    import os
    import signal
    import time

    sweep = tmp_path / "sweep"
    args = [
        sys.executable,
        "-m",
        "benchmarks.run",
        "suite=smoke",
        f"sweep_dir={sweep}",
        "suite.steps=4",
        "suite.seeds=[0]",
        "suite.algorithms=[grpo]",
        "suite.jobs=1",
        "suite.eval.every=0",
        "suite.eval.size=4",
        "suite.eval.pass_k=1",
        "suite.eval.samples=1",
        "report=false",
        'suite.overrides=["model=tiny_qwen2_5_vl","trainer.accelerator=cpu","trainer.prompts_per_step=4",'
        '"rollout.group_size=4","rollout.max_new_tokens=16","+reward.components.accuracy.workers=0",'
        '"trainer.save_every=1"]',
    ]
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}
    run = sweep / "count" / "grpo" / "seed0"

    def steps() -> list[float]:
        f = run / "csv" / "metrics.csv"
        if not f.exists():
            return []
        with open(f, newline="") as fh:
            return [float(r["rl_step"]) for r in csv.DictReader(fh) if r.get("reward")]

    p = subprocess.Popen(
        args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    t0 = time.monotonic()
    while len(steps()) < 2:  # a checkpoint (save_every=1) exists once step 2 is logged
        assert p.poll() is None and time.monotonic() - t0 < 600, p.communicate()[0][-3000:]
        time.sleep(0.2)
    os.killpg(p.pid, signal.SIGINT)  # Ctrl-C in the sweep's terminal
    out, _ = p.communicate(timeout=600)
    assert p.returncode == 130, out[-3000:]
    assert "INTERRUPTED (interrupted by SIGINT (Ctrl-C) to the sweep)" in out, out[-3000:]
    assert (run / "INTERRUPTED.json").exists() and not (run / "FAILED.json").exists()
    console = (sweep / "console.log").read_text()  # the sweep's own console, kept beside its runs
    assert "SIGINT (Ctrl-C): passing it on to the running run(s)" in console
    assert "[1/1] count/grpo/seed0: INTERRUPTED (interrupted by SIGINT (Ctrl-C) to the sweep)" in console
    again = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "resuming it from its last checkpoint" in again.stdout
    assert (run / "DONE.json").exists() and not (run / "INTERRUPTED.json").exists()
    assert steps() == [1.0, 2.0, 3.0, 4.0]  # nothing lost, nothing twice


def test_a_run_left_running_by_a_killed_sweep_is_resumed_from_its_checkpoint(tmp_path):
    """The sweep itself killed (kill -9, a node lost) while a run ran: its STARTED.json names the
    command; the next sweep resumes it from its newest complete checkpoint, or starts it over
    when it has none."""
    from benchmarks.run import decide
    from framework.checkpoint import write_marker

    run = _fake_run(tmp_path, "grpo", "ok", steps=4)
    run.run_dir.mkdir(parents=True)
    (run.run_dir / "STARTED.json").write_text(json.dumps({"status": "started", "command": run.command[3:]}))
    assert decide(run, FAKE_SUITE).action == "run"  # no checkpoint yet: start over
    ck = run.run_dir / "checkpoints" / "step-000002"
    (ck / "policy").mkdir(parents=True)
    (ck / "policy" / "model.safetensors").write_bytes(b"w")
    write_marker(ck)
    assert decide(run, FAKE_SUITE).action == "resume"
    _execute_fake(run)
    assert run.status == "done" and not (run.run_dir / "STARTED.json").exists()
    argv = [json.loads(ln) for ln in (run.run_dir / "argv.jsonl").read_text().splitlines()]
    assert argv == [[*run.command[3:], f"resume={run.run_dir}"]]
