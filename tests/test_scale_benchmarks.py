"""The update-throughput benchmark (benchmarks/update_throughput.py) on the tiny model on
CPU, and, on a GPU only, the real-size checks of the scale issue: bf16 training steps of a
Qwen2.5-VL-3B-shaped model with gradient checkpointing, and an FSDP run on the GPU."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def bench(*args, timeout=900) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.run(
        [sys.executable, "-m", "benchmarks.update_throughput", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    return p.stdout


def rows(out: str) -> list[list[str]]:
    return [
        [c.strip() for c in line.strip("|").split("|")]
        for line in out.splitlines()
        if re.match(r"\|\s*\d+ x \d+", line)
    ]


def test_update_benchmark_runs_the_framework_update_on_cpu():
    out = bench(
        "--arch",
        "tiny",
        "--device",
        "cpu",
        "--dtype",
        "float32",
        "--shapes",
        "4x128,8x128",
        "--prompt-tokens",
        "32",
        "--steps",
        "1",
        "--chunk",
        "128",
    )
    r = rows(out)
    assert [x[0] for x in r] == ["4 x 128", "8 x 128"]
    for x in r:
        assert float(x[1].replace(",", "")) > 0  # tokens/s
        assert all(float(v) > 0 for v in x[4:7])  # fwd, bwd, optimizer seconds


@pytest.mark.gpu
def test_qwen2_5_vl_3b_bf16_update_on_gpu():
    """bf16 + gradient checkpointing on the 3B architecture at 16 x 1024 tokens: must fit well
    under the plain-PyTorch reference's 63 GiB peak (chunked log-probs)."""
    out = bench("--arch", "qwen2_5_vl_3b", "--device", "cuda", "--shapes", "16x1024", "--steps", "3")
    print(out)
    (r,) = rows(out)
    assert r[1] != "OOM"
    assert float(r[3]) < 63.0


@pytest.mark.gpu
def test_fsdp_bf16_run_on_one_gpu(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "offline"}
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "framework.run",
            "trainer=fsdp",
            "trainer.devices=1",
            "trainer.accelerator=gpu",
            "trainer.max_steps=2",
            "trainer.prompts_per_step=8",
            "rollout.group_size=4",
            "trainer.eval_every=0",
            "trainer.eval_size=8",
            "logger.wandb=false",
            "trainer.progress_bar=false",
            f"output_dir={tmp_path}",
            f"hydra.run.dir={tmp_path}",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    assert "memory budget" in p.stdout
    assert (tmp_path / "checkpoints" / "step-000002" / "policy" / "model.safetensors").exists()
