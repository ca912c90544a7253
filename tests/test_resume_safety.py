"""Nothing lost on resume, checked without training (issue 23, items 1, 2, 8, 15): a resume
writes only into the folder the user names or the run folder that holds the checkpoint on
disk (never where ``run.json`` says alone), never over another run; every file of a checkpoint
is checked against its sha256 (a flipped byte in ``state.ckpt`` of the same size, an edited
stored config or ``run.json``), a damaged one naming the file and the next complete
checkpoint; a stored run's plugins are imported only when named again; a config file that
names code to run (a Hydra callback, a ``_target_``) is refused before anything runs."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from framework.checkpoint import (
    MARKER,
    RUN_CONFIG,
    RUN_INFO,
    check_complete,
    find_checkpoint,
    named_run_dir,
    resume_config,
    resume_folder,
    run_info,
    write_marker,
)
from framework.config_guard import code_in_config
from framework.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = str(ROOT / "configs")


def _checkpoint(d: Path, step: int, run_dir: Path, config: dict | None = None) -> Path:
    """A complete checkpoint folder as RLCheckpoint writes one (small files, real marker)."""
    (d / "policy").mkdir(parents=True)
    (d / "policy" / "config.json").write_text("{}")
    (d / "state.ckpt").write_bytes(bytes(range(256)) * 40)
    (d / RUN_INFO).write_text(json.dumps({"rl_step": step, "output_dir": str(run_dir), "wandb_id": "abc"}))
    (d / RUN_CONFIG).write_text(OmegaConf.to_yaml(OmegaConf.create(config or {"trainer": {"max_steps": 6}})))
    write_marker(d)
    return d


def _flip(p: Path, at: int) -> None:
    b = bytearray(p.read_bytes())
    b[at] ^= 0xFF
    p.write_bytes(bytes(b))


def test_the_marker_holds_every_files_sha256(tmp_path):
    d = _checkpoint(tmp_path / "run" / "checkpoints" / "step-000002", 2, tmp_path / "run")
    files = json.loads((d / MARKER).read_text())["files"]
    assert sorted(files) == sorted(["policy/config.json", RUN_CONFIG, RUN_INFO, "state.ckpt"])
    for rel, v in files.items():  # computed here with hashlib, independently of the writer
        assert v == {"size": (d / rel).stat().st_size, "sha256": hashlib.sha256((d / rel).read_bytes()).hexdigest()}


@pytest.mark.parametrize("rel", ["state.ckpt", RUN_CONFIG, RUN_INFO])
def test_a_same_size_change_of_any_file_is_caught_naming_the_next_checkpoint(tmp_path, rel):
    ck = tmp_path / "run" / "checkpoints"
    good = _checkpoint(ck / "step-000002", 2, tmp_path / "run")
    bad = _checkpoint(ck / "step-000004", 4, tmp_path / "run")
    size = (bad / rel).stat().st_size
    _flip(bad / rel, size // 2)  # same size: the old size check passed it
    assert (bad / rel).stat().st_size == size
    assert check_complete(bad) is None  # sizes only (what a sweep's quick scan checks)
    for resume in (bad, bad / "state.ckpt", tmp_path / "run"):  # named, or the run's newest
        with pytest.raises(ConfigError) as e:
            find_checkpoint(resume)
        msg = str(e.value)
        assert f"checkpoint {bad} is damaged: {rel} differs from when it was written" in msg, msg
        assert msg.endswith(f"resume from the next complete checkpoint: resume={good}"), msg
        assert "\n" not in msg
    assert find_checkpoint(good) == good


def test_a_damaged_checkpoint_without_an_earlier_one_says_start_a_new_run(tmp_path):
    d = _checkpoint(tmp_path / "run" / "checkpoints" / "step-000002", 2, tmp_path / "run")
    (d / RUN_CONFIG).write_text((d / RUN_CONFIG).read_text() + "seed: 7\n")  # another size
    with pytest.raises(ConfigError, match=r"run_config.yaml has \d+ bytes, \d+ when it was written.*start a new run"):
        find_checkpoint(tmp_path / "run")


def test_the_folder_a_resume_writes_to_comes_from_the_disk_never_from_run_json(tmp_path):
    run_a = tmp_path / "runA"
    ck = _checkpoint(run_a / "checkpoints" / "step-000004", 4, run_a)
    default = tmp_path / "outputs" / "new"
    # none named: the run folder that holds it, the same run (its W&B run continues)
    assert resume_folder(ck, None, str(default), run_info(ck)) == (run_a.resolve(), True)
    # named: that folder, a new one for the run's files
    assert resume_folder(ck, str(tmp_path / "runB"), str(default), run_info(ck)) == ((tmp_path / "runB"), False)
    # a copied checkpoint (cp -a runA/checkpoints/step-000004 elsewhere/): never back into runA
    copy = tmp_path / "elsewhere" / "step-000004"
    shutil.copytree(ck, copy)
    assert run_info(copy).output_dir == str(run_a)
    assert resume_folder(copy, None, str(default), run_info(copy)) == (default, False)
    # a run.json edited to point anywhere: the hash catches it before its word is read
    info = json.loads((ck / RUN_INFO).read_text())
    (ck / RUN_INFO).write_text(json.dumps({**info, "output_dir": str(tmp_path / "victim")}))
    with pytest.raises(ConfigError, match="run.json"):
        find_checkpoint(ck)


def test_a_resume_never_writes_over_another_run_or_the_same_runs_later_checkpoints(tmp_path):
    run_a, run_b = tmp_path / "runA", tmp_path / "runB"
    ck2 = _checkpoint(run_a / "checkpoints" / "step-000002", 2, run_a)
    _checkpoint(run_a / "checkpoints" / "step-000004", 4, run_a)
    (run_b / "csv").mkdir(parents=True)
    (run_b / "csv" / "metrics.csv").write_text("rl_step,reward\n1,0.5\n")
    with pytest.raises(ConfigError, match=rf"output folder {run_b} already holds a run \(csv/metrics.csv\)"):
        resume_folder(ck2, str(run_b), None, run_info(ck2))
    with pytest.raises(ConfigError, match=r"later checkpoints \(step-000004\).*hydra.run.dir=<folder>"):
        resume_folder(ck2, None, None, run_info(ck2))
    assert resume_folder(run_a / "checkpoints" / "step-000004", None, None, None) == (run_a.resolve(), True)
    assert (run_b / "csv" / "metrics.csv").read_text() == "rl_step,reward\n1,0.5\n"


def test_hydra_run_dir_names_the_folder():
    """Hydra keeps ``hydra.*`` out of its task overrides: the folder comes from its own."""
    assert named_run_dir(["hydra.run.dir=runB", "hydra.mode=RUN"], "/abs/runB") == "/abs/runB"
    assert named_run_dir(["hydra.mode=RUN"], "/abs/outputs/2026-12-07/10-00-00") is None


def _compose(*overrides):
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        return compose("config", overrides=list(overrides))


def test_a_stored_runs_plugins_are_imported_only_when_named_again(tmp_path):
    stored = OmegaConf.to_container(_compose("plugins=[reward_plugins_for_tests]"), resolve=False)
    stored.pop("hydra", None)
    stored.pop("output_dir")
    stored["optim"]["lr"] = 1e-6
    ck = _checkpoint(tmp_path / "run" / "checkpoints" / "step-000002", 2, tmp_path / "run", config=stored)
    cfg = _compose(f"resume={ck}", f"output_dir={tmp_path / 'new'}")
    with pytest.raises(ConfigError) as e:
        resume_config(cfg, {})
    assert "imports the plugin module(s) reward_plugins_for_tests" in str(e.value)
    assert "plugins=[reward_plugins_for_tests]" in str(e.value)
    merged, info, d = resume_config(cfg, {"plugins": ["reward_plugins_for_tests"]})
    assert list(merged.plugins) == ["reward_plugins_for_tests"] and d == ck and info.rl_step == 2


def test_a_stored_single_plugin_name_is_one_module_on_resume(tmp_path):
    """``plugins=my_module`` (a string, not a list) is one module, never read letter by letter."""
    stored = OmegaConf.to_container(_compose(), resolve=False)
    stored.pop("hydra", None)
    stored.pop("output_dir")
    stored["plugins"] = "reward_plugins_for_tests"
    stored["optim"]["lr"] = 1e-6
    ck = _checkpoint(tmp_path / "run" / "checkpoints" / "step-000002", 2, tmp_path / "run", config=stored)
    cfg = _compose(f"resume={ck}", f"output_dir={tmp_path / 'new'}")
    with pytest.raises(ConfigError) as e:
        resume_config(cfg, {})
    assert "imports the plugin module(s) reward_plugins_for_tests (" in str(e.value)
    resume_config(cfg, {"plugins": "reward_plugins_for_tests"})  # named again the same way: accepted


def test_resuming_the_final_checkpoint_is_a_finished_run(tmp_path):
    stored = OmegaConf.to_container(_compose(), resolve=False)
    stored.pop("hydra", None)
    stored.pop("output_dir")
    stored["optim"]["lr"] = 1e-6
    stored["trainer"]["max_steps"] = 4
    ck = _checkpoint(tmp_path / "run" / "checkpoints" / "step-000004", 4, tmp_path / "run", config=stored)
    _, info, _ = resume_config(_compose(f"resume={tmp_path / 'run'}"), {})
    assert info.complete and info.output_dir == str((tmp_path / "run").resolve())
    with pytest.raises(ConfigError, match="nothing left to train; set trainer.max_steps > 4"):
        resume_config(_compose(f"resume={ck}", "trainer.max_steps=3"), {"trainer.max_steps": 3})


# ----------------------------------------------------------------------------- config files run no code
def test_code_in_a_config_is_found():
    assert code_in_config({"hydra": {"callbacks": {}}, "seed": 0}) == []
    assert (
        code_in_config(
            {"hydra": {"launcher": {"_target_": "hydra._internal.core_plugins.basic_launcher.BasicLauncher"}}}
        )
        == []
    )
    assert code_in_config({"hydra": {"launcher": {"_target_": "os.system"}}}) == ["hydra.launcher._target_=os.system"]
    assert code_in_config({"model": {"x": {"_target_": "torch.load"}}}) == ["model.x._target_=torch.load"]
    logging_factory = {"hydra": {"job_logging": {"handlers": {"h": {"()": "subprocess.Popen"}}}}}
    assert code_in_config(logging_factory) == ["hydra.job_logging.handlers.h.()=subprocess.Popen"]


EXPERIMENT = """# @package _global_
hydra:
  callbacks:
    evil:
      _target_: os.makedirs
      name: {marker}
"""


@pytest.mark.parametrize(
    "body",
    [
        EXPERIMENT,
        "# @package _global_\ntrainer:\n  max_steps: 2\nx:\n  _target_: os.makedirs\n  name: {marker}\n",
        "# @package _global_\nhydra:\n  job_logging:\n    version: 1\n    handlers:\n      h:\n"
        "        (): os.makedirs\n        name: {marker}\n",
    ],
)
def test_an_experiment_file_with_code_to_run_is_refused_before_it_runs(tmp_path, body):
    marker = tmp_path / "pwned"
    (tmp_path / "downloaded" / "experiment").mkdir(parents=True)
    (tmp_path / "downloaded" / "experiment" / "x.yaml").write_text(body.format(marker=marker))
    env = {k: v for k, v in os.environ.items() if k != "APO_RL_DEBUG"}
    r = subprocess.run(
        [sys.executable, "-m", "framework.run", f"--config-dir={tmp_path / 'downloaded'}", "experiment=x"],
        cwd=tmp_path,
        env={**env, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    errors = [x for x in r.stderr.splitlines() if x.startswith("error:")]
    assert len(errors) == 1 and "the config names code to run" in errors[0] and "os.makedirs" in errors[0]
    assert "Traceback" not in r.stderr and not marker.exists()
