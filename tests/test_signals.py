"""Every stop ends cleanly, on the path a user takes (issue 23, items 1, 3, 5, 6): Ctrl-C
writes a checkpoint of the last completed step, prints the resume line and exits 130 (a second
exits at once, no traceback), and the resumed run equals the uninterrupted one; SIGTERM
abandons an evaluation in progress; a signal during the final step or after the final
checkpoint leaves a complete run (exit 0) that a resume reports as complete; a checkpoint write
that fails (disk full, a folder that cannot be written) is one error line, its ``.partial``
removed and the earlier checkpoint intact; a resume into another folder leaves the source
run untouched."""

import csv
import errno
import hashlib
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from framework.checkpoint import MARKER, CheckpointWriteError, check_complete

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = str(ROOT / "configs")
SMALL = [
    "trainer.prompts_per_step=4",
    "rollout.group_size=2",
    "rollout.max_new_tokens=16",
    "trainer.eval_size=4",
    "trainer.eval_every=0",
    "trainer.progress_bar=false",
    "logger.wandb=false",
    "+reward.components.accuracy.workers=0",
]
KEYS = ("reward", "loss", "kl", "grad_norm", "entropy", "lr", "completions/mean_length")


def _env():
    e = {k: v for k, v in os.environ.items() if k not in ("APO_RL_DEBUG",)}
    return {**e, "PYTHONPATH": str(ROOT), "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}


class Run:
    """A CLI run whose output is read line by line, so that a test can act on a given line."""

    def __init__(self, *args, cwd):
        self.p = subprocess.Popen(
            [sys.executable, "-m", "framework.run", *args],
            cwd=cwd,
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: list[str] = []
        self._q: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.p.stdout:
            self._q.put(line.rstrip("\n"))
        self._q.put(None)

    def wait_for(self, text: str, timeout: float = 600) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                line = self._q.get(timeout=1)
            except queue.Empty:
                continue
            if line is None:
                raise AssertionError(f"exited before {text!r}:\n" + "\n".join(self.lines[-40:]))
            self.lines.append(line)
            if text in line:
                return
        raise AssertionError(f"no {text!r} in {timeout} s:\n" + "\n".join(self.lines[-40:]))

    def finish(self, timeout: float = 600) -> tuple[int, str]:
        rc = self.p.wait(timeout=timeout)
        while (line := self._q.get(timeout=60)) is not None:
            self.lines.append(line)
        return rc, "\n".join(self.lines)


def _cli(*args, cwd, timeout=600) -> tuple[int, str]:
    r = subprocess.run(
        [sys.executable, "-m", "framework.run", *args],
        cwd=cwd,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return r.returncode, r.stdout + r.stderr


def _rows(run: Path) -> dict[float, dict]:
    rows = [r for r in csv.DictReader((run / "csv" / "metrics.csv").read_text().splitlines()) if r.get("reward")]
    steps = [float(r["rl_step"]) for r in rows]
    assert len(steps) == len(set(steps)), f"a step logged twice: {steps}"
    return {float(r["rl_step"]): r for r in rows}


def _ckpts(run: Path) -> list[str]:
    return sorted(d.name for d in (run / "checkpoints").iterdir())


def _digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()
    }


@pytest.mark.slow
def test_ctrl_c_checkpoints_the_last_step_exits_130_and_the_resumed_run_equals_the_uninterrupted(tmp_path):
    args = [*SMALL, "trainer.max_steps=3", "trainer.save_every=1", "trainer.keep_last=2"]
    full = Run(*args, "hydra.run.dir=full", cwd=tmp_path)
    run = Run(*args, "hydra.run.dir=run", cwd=tmp_path)
    run.wait_for("step 1/3")
    run.p.send_signal(signal.SIGINT)  # lands in step 2: its rollout is abandoned, its update finished
    rc, out = run.finish()
    assert rc == 130, out[-3000:]
    assert f"continue with resume={tmp_path / 'run'}" in out and "Traceback" not in out
    k = max(int(n.split("-")[1]) for n in _ckpts(tmp_path / "run"))
    assert k in (1, 2) and all(not n.endswith(".partial") for n in _ckpts(tmp_path / "run"))
    assert check_complete(tmp_path / "run" / "checkpoints" / f"step-{k:06d}", verify_hashes=True) is None
    rc, out = _cli("resume=run", cwd=tmp_path)
    assert rc == 0, out[-3000:]
    rc, out = full.finish()
    assert rc == 0, out[-3000:]
    a, b = _rows(tmp_path / "full"), _rows(tmp_path / "run")
    assert sorted(a) == sorted(b) == [1.0, 2.0, 3.0]
    for step in a:
        for key in KEYS:
            assert a[step][key] == b[step][key], (step, key)  # CPU: bit for bit, as written
    # periodic checkpoints every step, the newest 2 kept
    assert _ckpts(tmp_path / "full") == ["step-000002", "step-000003"]


@pytest.mark.slow
def test_a_second_ctrl_c_exits_at_once_without_a_traceback(tmp_path):
    run = Run(*SMALL, "trainer.max_steps=4", "hydra.run.dir=run", cwd=tmp_path)
    run.wait_for("step 1/4")
    run.p.send_signal(signal.SIGINT)
    run.wait_for("received Ctrl-C")  # (two at once would be one: a pending signal is not queued)
    run.p.send_signal(signal.SIGINT)
    rc, out = run.finish(timeout=120)
    assert rc == 130, out[-3000:]
    assert "Ctrl-C again: exiting now" in out and "Traceback" not in out and "KeyboardInterrupt" not in out


@pytest.mark.slow
def test_sigterm_abandons_an_evaluation_and_the_resume_redoes_it(tmp_path):
    args = [*SMALL, "trainer.max_steps=3", "trainer.eval_every=2", "trainer.eval_size=64", "trainer.eval_batch_size=2"]
    run = Run(*args, "hydra.run.dir=run", cwd=tmp_path)
    run.wait_for("evaluating 64 held-out records at RL step 2")
    t0 = time.time()
    run.p.send_signal(signal.SIGTERM)
    rc, out = run.finish()
    stopped_s = time.time() - t0
    assert rc == 75, out[-3000:]
    after = out.split("evaluating 64 held-out records at RL step 2")[1]
    assert "evaluated 64/64" not in after and "eval at step 2" not in after  # abandoned, not finished
    assert _ckpts(tmp_path / "run") == ["step-000002"]
    rc, out = _cli("resume=run", cwd=tmp_path)
    assert rc == 0, out[-3000:]
    rows = list(csv.DictReader((tmp_path / "run" / "csv" / "metrics.csv").read_text().splitlines()))
    assert [float(r["eval/step"]) for r in rows if r.get("eval/accuracy")] == [0.0, 2.0, 3.0]  # step 2's once
    assert sorted(_rows(tmp_path / "run")) == [1.0, 2.0, 3.0]
    print(f"stopped {stopped_s:.1f} s after SIGTERM, mid-evaluation")


@pytest.mark.slow
def test_a_signal_in_the_final_step_or_the_teardown_leaves_a_complete_run(tmp_path):
    args = [*SMALL, "trainer.max_steps=2", "trainer.eval_size=64", "trainer.eval_batch_size=2"]
    run = Run(*args, "hydra.run.dir=run", cwd=tmp_path)
    run.wait_for("evaluating 64 held-out records at RL step 2")  # the final evaluation
    run.p.send_signal(signal.SIGTERM)
    run.wait_for("writing checkpoint")
    run.p.send_signal(signal.SIGUSR1)  # during the final checkpoint or the teardown
    run.p.send_signal(signal.SIGTERM)
    rc, out = run.finish()
    assert rc == 0, out[-3000:]
    assert "during the final RL step: the run is complete" in out and "Traceback" not in out
    assert _ckpts(tmp_path / "run") == ["step-000002"]
    rc, out = _cli("resume=run", cwd=tmp_path)
    assert rc == 0, out[-3000:]
    assert "is complete: checkpoint" in out and "error" not in out


@pytest.mark.slow
def test_a_resume_into_another_folder_leaves_the_source_run_untouched(tmp_path):
    rc, out = _cli(
        *SMALL, "trainer.max_steps=4", "trainer.save_every=2", "trainer.keep_last=0", "hydra.run.dir=runA", cwd=tmp_path
    )
    assert rc == 0, out[-3000:]
    run_a = tmp_path / "runA"
    before = _digest(run_a)
    # the reproduction: hydra.run.dir= was ignored and runA's later rows deleted
    rc, out = _cli("resume=runA/checkpoints/step-000002", "trainer.max_steps=4", "hydra.run.dir=runB", cwd=tmp_path)
    assert rc == 0, out[-3000:]
    # a copied checkpoint, resumed with no folder named: a new folder, never back into runA
    shutil.copytree(run_a / "checkpoints" / "step-000002", tmp_path / "elsewhere" / "step-000002")
    rc, out = _cli("resume=elsewhere/step-000002", cwd=tmp_path)
    assert rc == 0, out[-3000:]
    assert _digest(run_a) == before  # every file of runA as it was
    (new,) = [p.parent.parent for p in (tmp_path / "outputs").glob("*/*/csv/metrics.csv")]
    a = _rows(run_a)
    for run in (tmp_path / "runB", new):
        b = _rows(run)
        assert sorted(b) == [3.0, 4.0]  # its files start at the checkpoint's step
        for step in b:
            for key in KEYS:
                assert a[step][key] == b[step][key], (run, step, key)
        assert _ckpts(run) == ["step-000002", "step-000004"]  # its start (save_every=2) and its end
    # continuing runA from step 2 would replace its step-4 checkpoint and rows: refused
    rc, out = _cli("resume=runA/checkpoints/step-000002", cwd=tmp_path, timeout=120)
    assert rc == 2 and "later checkpoints (step-000004)" in out, out[-3000:]
    rc, out = _cli("resume=runA", cwd=tmp_path, timeout=120)  # its final checkpoint: complete
    assert rc == 0 and "is complete" in out, out[-3000:]
    assert _digest(run_a) == before


@pytest.mark.slow
def test_a_checkpoint_folder_that_cannot_be_written_is_one_error_line(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoints").write_text("a file where the checkpoints folder goes")
    rc, out = _cli(*SMALL, "trainer.max_steps=1", "hydra.run.dir=run", cwd=tmp_path)
    assert rc == 2, out[-3000:]
    errors = [x for x in out.splitlines() if x.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in out, out[-3000:]
    assert f"could not write checkpoint step-000001 into {tmp_path / 'run' / 'checkpoints'}" in errors[0]
    assert "[ENOTDIR]" in errors[0] or "[EEXIST]" in errors[0], errors[0]


@pytest.mark.slow
def test_disk_full_while_writing_a_checkpoint_removes_the_partial_and_keeps_the_previous(tmp_path, monkeypatch):
    import lightning.fabric.plugins.io.torch_io as torch_io

    from framework.train import train

    real = torch_io._atomic_save

    def full_disk(checkpoint, filepath):  # the state.ckpt write of step 2 fails as a full disk does
        if "step-000002" in str(filepath):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(filepath))
        real(checkpoint, filepath)

    monkeypatch.setattr(torch_io, "_atomic_save", full_disk)
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        cfg = compose(
            "config", overrides=[f"output_dir={tmp_path}", *SMALL, "trainer.max_steps=2", "trainer.save_every=1"]
        )
    with pytest.raises(CheckpointWriteError) as e:
        train(cfg)
    msg = str(e.value)
    assert f"could not write checkpoint step-000002 into {tmp_path / 'checkpoints'}" in msg
    assert "No space left on device [ENOSPC]" in msg and f"resume={tmp_path}" in msg
    assert _ckpts(tmp_path) == ["step-000001"]  # no step-000002.partial left
    assert check_complete(tmp_path / "checkpoints" / "step-000001", verify_hashes=True) is None
    assert (tmp_path / "checkpoints" / "step-000001" / MARKER).is_file()


@pytest.mark.slow
def test_ctrl_c_before_the_first_step_is_one_line_and_130(tmp_path):
    run = Run(*SMALL, "trainer.max_steps=2", "hydra.run.dir=run", cwd=tmp_path)
    run.wait_for("recipe differs")  # checked before the model loads
    run.p.send_signal(signal.SIGINT)
    rc, out = run.finish(timeout=300)
    assert rc == 130, out[-3000:]
    assert "interrupted (Ctrl-C) before the first RL step" in out and "Traceback" not in out
