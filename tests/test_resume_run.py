"""``resume=`` continues the same run, on the path a user takes: an APO run started from the
CLI is killed (SIGKILL) after its step-2 checkpoint; ``resume=<run folder>`` alone brings
back its algorithm, its output folder and its W&B run, and steps 3-4 equal the uninterrupted
run's bit for bit on CPU. A conflicting override fails before any model loads; a half-written
or truncated checkpoint is never taken."""

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from framework.checkpoint import MARKER, find_checkpoint, write_marker
from framework.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
RUN = [
    "algorithm=apo",
    "reward=apo",
    "+reward.components.accuracy.workers=0",
    "trainer.max_steps=4",
    "trainer.save_every=2",
    "trainer.prompts_per_step=4",
    "rollout.group_size=4",
    "rollout.max_new_tokens=16",
    "trainer.eval_every=0",
    "trainer.eval_size=4",
    "trainer.progress_bar=false",
    "logger.wandb_mode=offline",
]
KEYS = ("reward", "loss", "kl", "grad_norm", "entropy", "beta", "lr", "completions/mean_length", "advantages/mean")


def _env():
    e = {k: v for k, v in os.environ.items() if k not in ("APO_RL_DEBUG", "WANDB_MODE")}
    return {**e, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}


def _cli(*args, cwd, **kw):
    return subprocess.Popen(
        [sys.executable, "-m", "framework.run", *args],
        cwd=cwd,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **kw,
    )


def _train_rows(run: Path) -> dict[float, dict]:
    rows = list(csv.DictReader((run / "csv" / "metrics.csv").read_text().splitlines()))
    train = [r for r in rows if r.get("reward")]
    steps = [float(r["rl_step"]) for r in train]
    assert len(steps) == len(set(steps)), f"a step logged twice: {steps}"
    return {float(r["rl_step"]): r for r in train}


def _wandb_ids(run: Path) -> set[str]:
    return {p.name.rsplit("-", 1)[-1] for p in (run / "wandb").glob("offline-run-*")}


@pytest.mark.slow
def test_killed_apo_run_resumes_as_the_same_run(tmp_path):
    full = _cli(*RUN, "hydra.run.dir=full", cwd=tmp_path)
    killed = _cli(*RUN, "hydra.run.dir=run", cwd=tmp_path)
    marker = tmp_path / "run" / "checkpoints" / "step-000002" / MARKER
    deadline = time.time() + 600
    while not marker.exists():
        assert killed.poll() is None, killed.communicate()[0][-3000:]
        assert time.time() < deadline
        time.sleep(0.05)
    killed.send_signal(signal.SIGKILL)  # no chance to save anything more
    killed.communicate()
    assert not (tmp_path / "run" / "checkpoints" / "step-000004").exists()
    out, _ = full.communicate(timeout=600)
    assert full.returncode == 0, out[-3000:]

    resumed = _cli("resume=run", cwd=tmp_path)
    out, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, out[-3000:]
    assert "algorithm=apo" in out and str(tmp_path / "run") in out
    assert (tmp_path / "run" / "checkpoints" / "step-000004" / MARKER).exists()  # the same folder

    a, b = _train_rows(tmp_path / "full"), _train_rows(tmp_path / "run")
    assert sorted(b) == [1.0, 2.0, 3.0, 4.0]  # steps 1-2 kept from before the kill, 3-4 continued
    for step in (1.0, 2.0, 3.0, 4.0):
        for k in KEYS:
            assert a[step][k] == b[step][k], (step, k, a[step][k], b[step][k])  # bit for bit (as written)
    ids = _wandb_ids(tmp_path / "run")
    assert len(ids) == 1 and len(list((tmp_path / "run" / "wandb").glob("offline-run-*"))) == 2  # one run id
    info = json.loads((tmp_path / "run" / "checkpoints" / "step-000004" / "run.json").read_text())
    assert info["wandb_id"] in ids and info["rl_step"] == 4

    # an override that changes what is trained fails at start, naming the key and its stored value
    t0 = time.time()
    bad = _cli("resume=run", "algorithm.kl.coef=0.5", "trainer.max_steps=6", cwd=tmp_path)
    out, _ = bad.communicate(timeout=120)
    assert bad.returncode == 2, out[-3000:]
    assert "algorithm.kl.coef=0.5 (stored: 0.001)" in out and "memory budget" not in out
    assert "trainer.max_steps" not in out.split("stored run")[1].split("Only")[0]  # max_steps may change
    assert time.time() - t0 < 60

    # resuming a finished run (its final checkpoint) says it is complete, in one line, exit 0
    done = _cli("resume=run", cwd=tmp_path)
    out, _ = done.communicate(timeout=120)
    assert done.returncode == 0 and "is complete: checkpoint" in out and "error" not in out, out[-3000:]
    # asking for fewer steps than it has is a mistake: exit 2
    less = _cli("resume=run", "trainer.max_steps=3", cwd=tmp_path)
    out, _ = less.communicate(timeout=120)
    assert less.returncode == 2 and "nothing left to train" in out


def _fake_checkpoint(d: Path, *, complete: bool):
    (d / "policy").mkdir(parents=True)
    (d / "policy" / "config.json").write_text("{}")
    (d / "state.ckpt").write_bytes(b"x" * 100)
    if complete:
        write_marker(d)


def test_resume_never_takes_a_half_written_checkpoint(tmp_path):
    ck = tmp_path / "run" / "checkpoints"
    _fake_checkpoint(ck / "step-000002", complete=True)
    _fake_checkpoint(ck / "step-000004.partial", complete=False)  # killed while writing
    _fake_checkpoint(ck / "step-000006", complete=False)  # no marker: an interrupted older writer
    _fake_checkpoint(ck / "step-000008", complete=True)
    (ck / "step-000008" / "state.ckpt").write_bytes(b"x" * 10)  # truncated after the marker was written
    # the newest is damaged (changed after it was written): one error naming the file and the
    # next complete checkpoint (never a silent fall-back); the interrupted ones are skipped
    for resume in (tmp_path / "run", ck / "step-000008"):
        with pytest.raises(ConfigError, match=r"state.ckpt has 10 bytes, 100 when it was written") as e:
            find_checkpoint(resume)
        assert str(e.value).endswith(f"resume from the next complete checkpoint: resume={ck / 'step-000002'}")
    (ck / "step-000008" / "state.ckpt").write_bytes(b"x" * 100)  # put back as written
    assert find_checkpoint(tmp_path / "run") == ck / "step-000008"
    shutil.rmtree(ck / "step-000008")
    assert find_checkpoint(tmp_path / "run") == ck / "step-000002"
    with pytest.raises(ConfigError, match=r"incomplete: it has no COMPLETE.json"):
        find_checkpoint(ck / "step-000006" / "state.ckpt")
    empty = tmp_path / "other" / "checkpoints" / "step-000002"
    empty.mkdir(parents=True)
    (empty / "state.ckpt").write_bytes(b"x")
    write_marker(empty)  # complete, but its policy/ export is missing
    with pytest.raises(ConfigError, match="policy/ export is empty"):
        find_checkpoint(empty)
