"""What a researcher sees when the output goes to a file (SLURM, nohup, ``> log``): a
start-up block, one progress line per ``trainer.log_every`` RL steps, evaluation lines, no
line twice, and none of the third-party noise that is filtered at its source."""

import collections
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_a_run_with_output_to_a_file_prints_progress_lines_once(tmp_path):
    log = tmp_path / "run.log"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    env.pop("APO_RL_DEBUG", None)
    with log.open("w") as f:
        p = subprocess.run(
            [
                sys.executable,
                "-m",
                "framework.run",
                "trainer.max_steps=4",
                "trainer.log_every=2",
                "trainer.prompts_per_step=4",
                "rollout.group_size=4",
                "rollout.max_new_tokens=8",
                "trainer.eval_every=0",
                "trainer.eval_size=4",
                f"hydra.run.dir={tmp_path / 'run'}",
            ],
            cwd=tmp_path,
            env=env,
            stdout=f,
            stderr=subprocess.STDOUT,
            timeout=600,
        )
    text = log.read_text()
    assert p.returncode == 0, text[-3000:]
    lines = [ln for ln in text.splitlines() if ln.strip()]
    assert [ln.split()[1] for ln in lines if ln.startswith("step ")] == ["2/4", "4/4"]  # every log_every steps
    assert any(ln.startswith("apo-rl memory budget") for ln in lines)
    assert any("outputs ->" in ln for ln in lines) and any(ln.startswith("eval at step 0") for ln in lines)
    twice = [ln for ln, n in collections.Counter(lines).items() if n > 1 and not ln.startswith("  ")]
    assert not twice, twice
    for noise in ("litlogger", "LeafSpec", "Loading weights", "Writing model shards", "`weights_only` was not set"):
        assert noise not in text, noise
