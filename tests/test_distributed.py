"""A 2-process DDP run (gloo, CPU) over the same global batch gives the same losses and
gradients as a 1-process run: prompts are sharded by rank with whole groups per rank,
token_mean divides by the global token count, gradients are summed once per step.

Samples are drawn per prompt from their own seed (rollout.seed_per_prompt=true), so both
runs train on identical completions; everything else is the real loop."""
import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COMMON = ["trainer.max_steps=3", "trainer.prompts_per_step=8", "rollout.group_size=4", "trainer.eval_every=0",
          "trainer.eval_size=4", "logger.wandb=false", "trainer.progress_bar=false", "rollout.seed_per_prompt=true",
          "algorithm.loss_agg=token_mean", "trainer.accelerator=cpu"]


def _run(out: Path, *extra) -> list[dict]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "offline"}
    p = subprocess.run([sys.executable, "-m", "framework.run", *COMMON, *extra, f"output_dir={out}", f"hydra.run.dir={out}"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    rows = list(csv.DictReader(open(out / "csv" / "metrics.csv")))
    return [{k: float(v) for k, v in r.items() if v} for r in rows if r.get("reward")]


@pytest.mark.slow
def test_ddp_two_processes_match_one_process(tmp_path):
    one = _run(tmp_path / "one")
    two = _run(tmp_path / "two", "trainer.strategy=ddp", "trainer.devices=2")
    assert [r["rl_step"] for r in one] == [r["rl_step"] for r in two] == [1.0, 2.0, 3.0]
    for a, b in zip(one, two):
        for k in ("reward", "loss", "kl", "grad_norm", "completions/mean_length", "entropy"):
            assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-6), (a["rl_step"], k)
    assert one[-1]["kl"] > 0  # the weights moved, identically, in both runs
