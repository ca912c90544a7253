"""Nothing silent, nothing lost: non-finite gradients behind a finite loss are caught (stop
with the cause, or skip with the weights untouched), a NaN metric is logged as NaN, eval/*
appear only on evaluation steps, WANDB_MODE=disabled is respected, and a SIGTERM (a
scheduler's preemption) writes a checkpoint of the last step and exits 75, after which
``resume=`` - and a re-run of the sweep - continue the run."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from algorithms.grpo import GRPO
from framework.errors import EXIT_PREEMPTED, NonFiniteError
from framework.registry import ALGORITHMS
from framework.train import train

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = str(ROOT / "configs")
SMALL = [
    "trainer.prompts_per_step=4",
    "rollout.group_size=4",
    "trainer.eval_every=0",
    "trainer.eval_size=4",
    "trainer.progress_bar=false",
]


def _cfg(tmp_path, *overrides):
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        return compose("config", overrides=[f"output_dir={tmp_path}", "logger.wandb=false", *SMALL, *overrides])


class NaNGradient(GRPO):
    """Test-only: the loss stays finite, its gradient is NaN (the torch.where trap: the branch
    not taken still back-propagates 0 * NaN)."""

    def loss(self, logp, mb, norm):
        loss, terms = super().loss(logp, mb, norm)
        trap = torch.where(torch.zeros_like(logp, dtype=torch.bool), torch.sqrt(logp), torch.zeros_like(logp))
        return loss + trap.sum(), terms


class NaNRewards(GRPO):
    def shape_rewards(self, rollout):
        return rollout.rewards * float("nan")


ALGORITHMS.register("test_nan_grad", NaNGradient, override=True)
ALGORITHMS.register("test_nan_rewards", NaNRewards, override=True)


def _policy_weights(ckpt: Path) -> dict:
    st = torch.load(ckpt / "state.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    return {k: v for k, v in st.items() if k.startswith("policy.")}


def test_nan_gradients_with_a_finite_loss_stop_or_skip(tmp_path):
    common = ["algorithm.name=test_nan_grad", "trainer.max_steps=2"]
    with pytest.raises(NonFiniteError, match=r"non-finite gradient norm at RL step 0 \(optimizer step 0\).*grad_norm"):
        train(_cfg(tmp_path / "a", *common))
    res = train(_cfg(tmp_path / "b", *common, "trainer.on_nonfinite=skip"))
    rows = [r for r in res.history if "reward" in r]
    assert [r.get("nonfinite_skipped") for r in rows] == [1.0, 1.0] and all("grad_norm" not in r for r in rows)
    # the weights are untouched: equal to the warm-started model's
    from transformers import AutoModelForImageTextToText

    from framework.models.loading import resolve_path

    init = AutoModelForImageTextToText.from_pretrained(resolve_path("tiny:qwen2_5_vl-sft")).state_dict()
    for k, v in _policy_weights(res.final_checkpoint).items():
        assert torch.equal(v, init[k.removeprefix("policy.")]), k
    st = torch.load(res.final_checkpoint / "state.ckpt", map_location="cpu", weights_only=True)
    assert st["global_step"] == 2  # the step counters still advanced


def _csv_rows(run: Path) -> list[dict]:
    return list(csv.DictReader((run / "csv" / "metrics.csv").read_text().splitlines()))


def test_nan_metrics_are_logged_as_nan_and_eval_only_on_eval_steps(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")  # the environment wins over logger.wandb_mode=offline
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        cfg = compose(
            "config",
            overrides=[
                f"output_dir={tmp_path}",
                *SMALL,
                "algorithm.name=test_nan_rewards",
                "trainer.max_steps=4",
                "trainer.on_nonfinite=skip",
                "trainer.eval_every=2",
            ],
        )
    train(cfg)
    assert not (tmp_path / "wandb").exists()
    rows = _csv_rows(tmp_path)
    train_rows = [r for r in rows if r.get("reward")]
    assert [float(r["rl_step"]) for r in train_rows] == [1.0, 2.0, 3.0, 4.0]
    assert all(r["reward"] == "nan" for r in train_rows)  # NaN, not the previous step's value
    assert all(not r.get("eval/accuracy") for r in train_rows)  # no eval value on a training row
    evals = [r for r in rows if r.get("eval/accuracy")]
    assert [float(r["eval/step"]) for r in evals] == [0.0, 2.0, 4.0]
    assert all(r["step"] == r["rl_step"].split(".")[0] for r in rows)  # one step axis: the RL step


def _wandb_records(path: Path) -> list:
    """The records of a W&B offline run file (``run-<id>.wandb``), read with W&B's own protobuf
    schema. The container is a LevelDB-style log: a 7-byte file header, 32 KiB blocks, each
    record a 7-byte header (crc32, length, type: 1 full, 2 first, 3 middle, 4 last) + payload."""
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", path
    pos, block, buf, out = 7, 32768, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        _crc, n, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk = data[pos + 7 : pos + 7 + n]
        pos += 7 + n
        if kind == 0:
            continue
        buf = chunk if kind in (1, 2) else buf + chunk
        if kind in (1, 4):
            r = pb.Record()
            r.ParseFromString(buf)
            out.append(r)
            buf = b""
    return out


def test_wandb_offline_history_is_on_the_rl_step_with_eval_only_on_eval_steps(tmp_path, monkeypatch):
    import json

    monkeypatch.setenv("WANDB_MODE", "offline")
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        cfg = compose(
            "config",
            overrides=[
                f"output_dir={tmp_path}",
                *SMALL,
                "trainer.max_steps=3",
                "trainer.eval_every=2",
                "rollout.max_new_tokens=8",
                "+reward.components.accuracy.workers=0",
            ],
        )
    train(cfg)
    (run_file,) = tmp_path.glob("wandb/offline-run-*/run-*.wandb")
    records = _wandb_records(run_file)
    step_metric = [r.metric for r in records if r.WhichOneof("record_type") == "metric" and r.metric.glob_name == "*"]
    assert step_metric[-1].step_metric == "rl_step"  # define_metric: every chart against the RL step
    rows = []
    for r in records:
        if r.WhichOneof("record_type") == "history":
            rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item})
    train_rows = [r for r in rows if "reward" in r]
    eval_rows = [r for r in rows if any(k.startswith("eval/") for k in r)]
    assert [r["rl_step"] for r in train_rows] == [1, 2, 3]
    assert [r["rl_step"] for r in eval_rows] == [0, 2, 3]  # at the start, every 2 steps, at the end
    assert all(r["eval/step"] == r["rl_step"] for r in eval_rows)
    assert not any(k.startswith("eval/") for r in train_rows for k in r)  # never carried onto training rows
    assert all("rl_step" in r for r in rows)


def _env():
    e = {k: v for k, v in os.environ.items() if k not in ("APO_RL_DEBUG",)}
    return {**e, "PYTHONPATH": str(ROOT), "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}


RUN = [
    *SMALL,
    "trainer.max_steps=6",
    "rollout.max_new_tokens=16",
    "logger.wandb=false",
    "+reward.components.accuracy.workers=0",
]


def _wait_for_rows(run: Path, n: int, proc, timeout=300):
    deadline = time.time() + timeout
    while True:
        f = run / "csv" / "metrics.csv"
        if f.exists() and sum(1 for r in _csv_rows(run) if r.get("reward")) >= n:
            return
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        assert time.time() < deadline
        time.sleep(0.1)


@pytest.mark.slow
def test_sigterm_checkpoints_the_last_step_and_exits_75_then_resume_finishes(tmp_path):
    run = tmp_path / "run"
    p = subprocess.Popen(
        [sys.executable, "-m", "framework.run", *RUN, f"hydra.run.dir={run}"],
        cwd=tmp_path,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    _wait_for_rows(run, 1, p)
    p.send_signal(signal.SIGTERM)
    out, _ = p.communicate(timeout=300)
    assert p.returncode == EXIT_PREEMPTED, out[-3000:]
    assert "preempted by SIGTERM after RL step" in out and "resume=" in out
    ckpts = sorted((run / "checkpoints").glob("step-*"))
    assert len(ckpts) == 1 and (ckpts[0] / "COMPLETE.json").exists()
    k = int(ckpts[0].name.split("-")[1])
    assert 1 <= k < 6
    r = subprocess.run(
        [sys.executable, "-m", "framework.run", f"resume={run}"],
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    steps = [float(x["rl_step"]) for x in _csv_rows(run) if x.get("reward")]
    assert steps == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]  # nothing lost, nothing twice


@pytest.mark.slow
def test_a_preempted_sweep_resumes_its_interrupted_run(tmp_path):
    sweep = tmp_path / "sweep"
    args = [
        sys.executable,
        "-m",
        "benchmarks.run",
        "suite=smoke",
        "suite.steps=6",
        "suite.seeds=[0]",
        "suite.algorithms=[grpo]",
        "suite.jobs=1",
        "suite.eval.every=0",
        "suite.eval.size=4",
        "suite.eval.pass_k=1",
        "suite.eval.samples=1",
        "report=false",
        f"sweep_dir={sweep}",
        "suite.overrides="
        + json.dumps(
            [
                "model=tiny_qwen2_5_vl",
                "trainer.accelerator=cpu",
                "trainer.prompts_per_step=4",
                "rollout.group_size=4",
                "rollout.max_new_tokens=16",
                "+reward.components.accuracy.workers=0",
            ]
        ),
    ]
    p = subprocess.Popen(args, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    run = sweep / "count" / "grpo" / "seed0"
    _wait_for_rows(run, 1, p)
    p.send_signal(signal.SIGTERM)  # to the sweep: passed on to its running run
    out, _ = p.communicate(timeout=300)
    assert p.returncode == EXIT_PREEMPTED, out[-3000:]
    assert "INTERRUPTED" in out and json.loads((run / "INTERRUPTED.json").read_text())["returncode"] == EXIT_PREEMPTED
    again = subprocess.run(args, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "resuming it from its last checkpoint" in again.stdout
    assert (run / "DONE.json").exists() and not (run / "INTERRUPTED.json").exists()
    steps = [float(x["rl_step"]) for x in _csv_rows(run) if x.get("reward")]
    assert steps == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]


def test_a_run_id_left_open_in_a_shared_wandb_service(tmp_path):
    """W&B shares a process's service with its children (``WANDB_SERVICE``); a run id a killed
    child left open there is refused as "in use" to the run that resumes it. That is one
    clear line naming the fix, and a child started with ``without_wandb_service`` (as
    ``benchmarks.run`` starts its runs) is not affected."""
    child = f"""
import sys
sys.path.insert(0, {str(ROOT)!r})
from framework.errors import UserError, one_line
from framework.loggers import RunWandbLogger
lg = RunWandbLogger(id="openrun42", save_dir={str(tmp_path)!r}, resume="allow")
try:
    lg.experiment
except UserError as e:
    print("USERERROR", one_line(e))
else:
    print("STARTED", lg.experiment.id)
    lg.experiment.finish()
"""
    parent = f"""
import os, subprocess, sys
import wandb
sys.path.insert(0, {str(ROOT)!r})
from framework.loggers import without_wandb_service
run = wandb.init(mode="offline", dir={str(tmp_path)!r}, id="openrun42")  # left open, as a killed run's
assert os.environ.get("WANDB_SERVICE")
for env in (dict(os.environ), without_wandb_service(dict(os.environ))):
    p = subprocess.run([sys.executable, "-c", {child!r}], env=env, capture_output=True, text=True, timeout=240)
    print(p.stdout.strip().splitlines()[-1] if p.stdout.strip() else "NOTHING " + p.stderr[-2000:])
run.finish()
"""
    env = {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}
    p = subprocess.run(
        [sys.executable, "-c", parent],
        env={**env, "WANDB_MODE": "offline"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    lines = p.stdout.strip().splitlines()
    assert p.returncode == 0 and len(lines) == 2, p.stdout + p.stderr[-3000:]
    shared, own = lines
    assert shared.startswith("USERERROR W&B run openrun42 is still open in the W&B service"), shared
    assert "Unset WANDB_SERVICE" in shared
    assert own == "STARTED openrun42", own
