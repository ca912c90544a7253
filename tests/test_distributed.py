"""Multi-process training on CPU (gloo) against a 1-process run over the same global batch.

DDP (2 processes) and FSDP2 (2 processes, full sharding, fp32) must give the same losses,
gradient norms and weights as 1 process: prompts are sharded by rank with whole groups per
rank, token_mean divides by the global token count, DDP sums gradients once per step, FSDP
averages them (the loss is scaled by the world size). A bf16 + activation-checkpointing +
CPU-offload FSDP run saves a sharded checkpoint that resumes on 1 device and exports to
Hugging Face format.

Samples are drawn per prompt from their own seed (rollout.seed_per_prompt=true), so all
runs train on identical completions; everything else is the real loop."""

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
COMMON = [
    "trainer.prompts_per_step=8",
    "rollout.group_size=4",
    "trainer.eval_every=0",
    "trainer.eval_size=5",
    "trainer.eval_batch_size=2",
    "logger.wandb=false",
    "trainer.progress_bar=false",
    "rollout.seed_per_prompt=true",
    "algorithm.loss_agg=token_mean",
    "trainer.accelerator=cpu",
]
KEYS = ("reward", "loss", "kl", "grad_norm", "completions/mean_length", "entropy")


def _run(out: Path, *extra, steps: int = 3, evals: bool = False) -> list[dict]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "offline"}
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "framework.run",
            *COMMON,
            f"trainer.max_steps={steps}",
            *extra,
            f"output_dir={out}",
            f"hydra.run.dir={out}",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    rows = list(csv.DictReader((out / "csv" / "metrics.csv").read_text().splitlines()))
    # training rows (and with evals=True the evaluation rows: each its own row, at its RL step)
    keep = [r for r in rows if r.get("reward") or (evals and r.get("eval/accuracy"))]
    return [{k: float(v) for k, v in r.items() if v} for r in keep]


def _weights(run: Path, step: int) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run / "checkpoints" / f"step-{step:06d}" / "policy" / "model.safetensors"))


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    out = tmp_path_factory.mktemp("one")
    return out, _run(out, evals=True)


def _assert_same_run(one_rows, other_rows, rel=1e-4):
    one = [r for r in one_rows if "reward" in r]
    other = [r for r in other_rows if "reward" in r]
    assert [r["rl_step"] for r in one] == [r["rl_step"] for r in other] == [1.0, 2.0, 3.0]
    for a, b in zip(one, other):
        for k in KEYS:
            assert a[k] == pytest.approx(b[k], rel=rel, abs=1e-6), (a["rl_step"], k)
    assert one[-1]["kl"] > 0  # the weights moved, identically, in both runs
    # held-out evaluation: each rank evaluates its share, the metrics are reduced over ranks
    # (the greedy ones are deterministic, so they equal the 1-process values)
    one_evals = [r for r in one_rows if "eval/accuracy" in r]
    other_evals = [r for r in other_rows if "eval/accuracy" in r]
    assert [r["eval/step"] for r in one_evals] == [r["eval/step"] for r in other_evals] == [0.0, 3.0]
    evals = list(zip(one_evals, other_evals))
    for a, b in evals:
        for k in ("eval/accuracy", "eval/mean_length", "eval/format"):
            assert a[k] == pytest.approx(b[k], rel=1e-6), k


@pytest.mark.slow
def test_ddp_two_processes_match_one_process(tmp_path, one_process):
    two = _run(tmp_path / "two", "trainer.strategy=ddp", "trainer.devices=2", evals=True)
    _assert_same_run(one_process[1], two)


@pytest.mark.slow
def test_fsdp_two_processes_match_one_process(tmp_path, one_process):
    out = tmp_path / "fsdp"
    two = _run(
        out,
        "trainer=fsdp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "trainer.fsdp.mixed_precision=null",
        "trainer.fsdp.activation_checkpointing=false",
        evals=True,
    )
    _assert_same_run(one_process[1], two)
    ckpt = out / "checkpoints" / "step-000003"
    assert {"__0_0.distcp", "__1_0.distcp", "meta.pt"} <= {p.name for p in (ckpt / "state.ckpt").iterdir()}
    # the Hugging Face export gathers the shards: the same weights as the 1-process run
    ref, got = _weights(one_process[0], 3), _weights(out, 3)
    assert ref.keys() == got.keys()
    init = _weights_initial()
    # Adam turns float noise in near-zero gradients into full-size steps of single elements,
    # so the updates are compared as a whole: relative error of the weight change
    d_ref = torch.cat([(ref[k] - init[k]).flatten() for k in sorted(ref)])
    d_got = torch.cat([(got[k] - init[k]).flatten() for k in sorted(ref)])
    assert float(d_ref.norm()) > 1e-2  # the weights compared are trained ones, not the initial ones
    assert float((d_got - d_ref).norm() / d_ref.norm()) < 1e-3


def _weights_initial() -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    from framework.models.loading import resolve_path

    return load_file(str(Path(resolve_path("tiny:qwen2_5_vl-sft")) / "model.safetensors"))


@pytest.mark.slow
def test_fsdp_bf16_offload_checkpoint_resumes_on_one_device(tmp_path):
    """FSDP with bf16 compute, activation checkpointing and CPU offload trains; its sharded
    checkpoint (2 ranks) resumes on 1 device with the trained weights and continues the step
    count; policy/ loads with from_pretrained."""
    fsdp = [
        "trainer=fsdp",
        "trainer.accelerator=cpu",
        "trainer.fsdp.mixed_precision=bf16",
        "trainer.fsdp.activation_checkpointing=true",
        "trainer.fsdp.cpu_offload=true",
    ]
    first = _run(tmp_path / "a", *fsdp, "trainer.devices=2", steps=2)
    assert [r["rl_step"] for r in first] == [1.0, 2.0]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in first)
    ckpt = tmp_path / "a" / "checkpoints" / "step-000002"
    resumed = _run(tmp_path / "b", *fsdp, "trainer.devices=1", f"resume={ckpt}", steps=3)
    assert [r["rl_step"] for r in resumed] == [3.0]
    # KL to the reference is measured before the step's update: > 0 only if the trained
    # weights (not the initial ones, which equal the reference) were restored
    assert resumed[0]["kl"] > 1e-6
    assert resumed[0]["beta"] == pytest.approx(first[0]["beta"])

    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(str(ckpt / "policy"))
    assert model.dtype == torch.float32  # master weights: fp32 (bf16 is the compute dtype only)
    init = _weights_initial()
    name = next(k for k in init if "layers.0.mlp.up_proj" in k)
    trained = dict(model.named_parameters())
    key = next(k for k in trained if k.endswith(name.split("model.", 1)[-1]))
    assert not torch.equal(trained[key].detach(), init[name])


def test_sharded_checkpoint_needs_fsdp_to_resume(tmp_path):
    from framework.checkpoint import resolve_resume, write_marker
    from framework.config import ConfigError

    d = tmp_path / "step-000002" / "state.ckpt"
    d.mkdir(parents=True)
    (d / "meta.pt").write_bytes(b"")
    (tmp_path / "step-000002" / "policy").mkdir()
    (tmp_path / "step-000002" / "policy" / "config.json").write_text("{}")
    write_marker(tmp_path / "step-000002")  # a complete checkpoint (resume refuses incomplete ones)
    with pytest.raises(ConfigError, match="trainer=fsdp"):
        resolve_resume(tmp_path / "step-000002", "ddp")
    assert resolve_resume(tmp_path / "step-000002", "fsdp") == str(d)
    with pytest.raises(ConfigError, match="no such file"):
        resolve_resume(tmp_path / "nothing", "fsdp")
