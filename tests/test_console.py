"""What a researcher sees when the output goes to a file (SLURM, nohup, ``> log``): a
start-up block, one progress line per ``trainer.log_every`` RL steps, evaluation lines, no
line twice, and none of the third-party noise that is filtered at its source."""

import collections
import csv
import os
import pty
import re
import subprocess
import sys
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHORT = [
    "trainer.prompts_per_step=4",
    "rollout.group_size=4",
    "rollout.max_new_tokens=8",
    "trainer.eval_every=0",
    "trainer.eval_size=4",
]


def _env(wandb_mode: str = "disabled"):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": wandb_mode, "HF_HUB_OFFLINE": "1"}
    env.pop("APO_RL_DEBUG", None)
    return env


def test_a_run_with_output_to_a_file_prints_progress_lines_once(tmp_path):
    log = tmp_path / "run.log"
    with log.open("w") as f:
        p = subprocess.run(
            [
                sys.executable,
                "-m",
                "framework.run",
                "trainer.max_steps=4",
                "trainer.log_every=2",
                *SHORT,
                f"hydra.run.dir={tmp_path / 'run'}",
            ],
            cwd=tmp_path,
            env=_env("offline"),  # W&B offline, as a user's run (the default) logs
            stdout=f,
            stderr=subprocess.STDOUT,
            timeout=600,
        )
    text = log.read_text()
    assert p.returncode == 0, text[-3000:]
    lines = [ln for ln in text.splitlines() if ln.strip()]
    progress = [ln for ln in lines if ln.startswith("step ")]
    assert [ln.split()[1] for ln in progress] == ["2/4", "4/4"]  # every log_every steps
    # each line shows the step's own logged numbers (RL step axis of metrics.csv)
    with (tmp_path / "run" / "csv" / "metrics.csv").open() as f:
        rows = {int(float(r["rl_step"])): r for r in csv.DictReader(f) if r.get("reward")}
    for ln in progress:
        words = ln.split()
        shown = dict(zip(words[2::2], words[3::2], strict=True))
        row = rows[int(words[1].split("/")[0])]
        assert set(shown) == {"reward", "acc", "kl", "s/step"}, ln
        assert float(shown["reward"]) == round(float(row["reward"]), 3), (ln, row["reward"])
        assert float(shown["acc"]) == round(float(row["accuracy"]), 3), (ln, row["accuracy"])
        assert float(shown["s/step"]) > 0
    assert any(ln.startswith("apo-rl memory budget") for ln in lines)
    assert any("outputs ->" in ln for ln in lines) and any(ln.startswith("eval at step 0") for ln in lines)
    assert any(ln.strip() == "evaluated 4/4" for ln in lines)  # evaluation shows its progress too
    twice = [ln for ln, n in collections.Counter(lines).items() if n > 1 and not ln.startswith("  ")]
    assert not twice, twice
    noises = (
        "litlogger",
        "LeafSpec",
        "Loading weights",
        "Writing model shards",
        "`weights_only` was not set",
        "wandb:",
    )
    for noise in noises:
        assert noise not in text, noise


def test_in_a_terminal_the_bar_counts_rl_steps_with_reward_accuracy_kl_and_step_time(tmp_path):
    """Run under a pseudo-terminal: Lightning's rich bar, described as RL steps of max_steps,
    with the step's numbers and none of Lightning's epoch / ``v_num`` columns."""
    master, slave = pty.openpty()
    chunks: list[bytes] = []

    def drain():  # a pty's buffer is small: read while the run writes
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    env = {**_env(), "COLUMNS": "160", "TERM": "xterm"}
    p = subprocess.run(
        [sys.executable, "-m", "framework.run", "trainer.max_steps=3", *SHORT, f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=tmp_path,
        env=env,
        stdout=slave,
        stderr=slave,
        timeout=600,
    )
    os.close(slave)
    reader.join(timeout=10)
    os.close(master)
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", b"".join(chunks).decode(errors="replace"))
    assert p.returncode == 0, text[-3000:]
    assert "RL step" in text and "3/3" in text, text[-2000:]
    for shown in ("reward", "acc", "kl", "s/step"):
        assert shown in text, (shown, text[-2000:])
    for lightning_column in ("Epoch", "v_num"):
        assert lightning_column not in text, text[-2000:]
    assert not re.search(r"^step \d+/\d+", text, re.M)  # no plain lines beside the bar
