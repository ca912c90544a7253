"""Mistakes that end a run at start in one ``error:`` line (exit status 2), without a traceback,
before any weight loads where the input is known then (issue 23, items 9, 13 and 14).

Each case runs ``train`` inside the CLI's own error handling (:func:`framework.run.user_errors`)
and asserts exit status 2 and that stderr is exactly the ``error:`` line naming the problem and
the debug hint; the issue's named regressions, and the cases known only with the model folder or
the data, run the real command (``python -m framework.run ...``, ~20 s each on a loaded 2-core
machine) as well. The cases whose check moved ahead of the weights run with the weight loader
replaced by one that fails the test, which proves the order."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from framework.config import ConfigError
from framework.errors import ModelNotFoundError
from framework.registry import PluginImportError, import_plugins, plugin_modules
from framework.run import DEBUG_HINT

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = str(ROOT / "configs")


def run_cli(
    tmp_path: Path, *args: str, pythonpath: str = "", max_steps: int = 1, timeout: float = 300
) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("APO_RL_DEBUG", "HYDRA_FULL_ERROR")}
    env.update(
        PYTHONPATH=os.pathsep.join(p for p in (pythonpath, str(ROOT)) if p), WANDB_MODE="offline", HF_HUB_OFFLINE="1"
    )
    cmd = [sys.executable, "-m", "framework.run", *args, f"trainer.max_steps={max_steps}", "logger.wandb=false"]
    cmd.append(f"hydra.run.dir={tmp_path / 'run'}")
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def assert_one_error(p: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit status 2, stderr = the ``error:`` line and the hint, no traceback anywhere."""
    both = p.stdout + p.stderr
    assert p.returncode == 2, both
    assert "Traceback" not in both, both
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("error: ") and lines[1] == DEBUG_HINT, p.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def write_local_data(d: Path, n: int) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    with open(d / "train.jsonl", "w") as f:
        for i in range(n):
            f.write(json.dumps({"id": f"r{i}", "question": f"What is {i}+1?", "answer": str(i + 1)}) + "\n")
    return d


def cfg_for(tmp_path: Path, *overrides: str):
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        return compose(
            "config",
            overrides=[
                f"output_dir={tmp_path / 'run'}",
                "logger.wandb=false",
                "trainer.progress_bar=false",
                *overrides,
            ],
        )


def run_train(tmp_path: Path, capsys, *args: str) -> str:
    """``train`` as the CLI runs it (its errors through ``user_errors``): the ``error:`` line."""
    from framework.run import user_errors
    from framework.train import train

    cfg = cfg_for(tmp_path, "trainer.max_steps=1", *args)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e, user_errors():
        train(cfg)
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("error: ") and lines[1] == DEBUG_HINT, err
    return lines[0]


@pytest.fixture(autouse=True)
def _no_debug(monkeypatch):
    monkeypatch.delenv("APO_RL_DEBUG", raising=False)


@pytest.fixture
def no_weight_loading(monkeypatch):
    """``load_model`` fails the test: a check that must come before the weights proves it does."""
    import framework.models.loading as loading

    def no_load(*a, **k):
        raise AssertionError("load_model was called: the check did not come before the weights")

    monkeypatch.setattr(loading, "load_model", no_load)


# ----------------------------------------------------------------------------- config checks
ATTN = ["model.attn_implementation='bogus' is not an attention implementation", "sdpa", "eager"]
CONFIG_CASES = {
    "attn_implementation": (["model.attn_implementation=bogus"], ATTN),
    "strategy": (["trainer.strategy=foo"], ["trainer.strategy='foo' is not a strategy", "ddp or fsdp"]),
    "eval_temperature": (["rollout.eval_temperature=-1"], ["rollout.eval_temperature=-1.0 must be >= 0"]),
    "lora_regex": (
        ["model.lora.enabled=true", 'model.lora.target_modules=".*[("'],
        ["model.lora.target_modules='.*[(' is not a valid regular expression", "all-linear"],
    ),
    "lora_vision_frozen": (
        ["model.lora.enabled=true", "model.lora.vision=true", "model.freeze_vision_tower=true"],
        ["model.lora.vision=true trains adapters on the vision tower but model.freeze_vision_tower=true freezes it"],
    ),
    "relative_plugin": (["plugins=[.foo]"], ["plugin module '.foo'", "not an importable module name"]),
    # one name without brackets is that module, not its letters ('n', 'o', ...)
    "plugin_as_a_string": (
        ["plugins=no_such_plugin_mod"],
        ["plugin module 'no_such_plugin_mod'", "could not be imported"],
    ),
}


@pytest.mark.parametrize("case", sorted(CONFIG_CASES))
def test_config_mistakes_end_in_one_error_line(tmp_path, capsys, no_weight_loading, case):
    args, needles = CONFIG_CASES[case]
    line = run_train(tmp_path, capsys, *args)
    for n in needles:
        assert n in line, line


def test_the_cli_prints_the_config_mistake_in_one_line(tmp_path):
    """The regression the issue names first, through the real command."""
    assert_one_error(run_cli(tmp_path, "model.attn_implementation=bogus"), *ATTN)


def test_a_single_plugin_name_is_a_one_element_list(tmp_path, capsys, no_weight_loading):
    assert (
        plugin_modules("os") == ["os"] and plugin_modules(["a.b", "c"]) == ["a.b", "c"] and plugin_modules(None) == []
    )
    with pytest.raises(ConfigError, match=r"plugins=\[1\]: give the module names to import as a list"):
        plugin_modules([1])
    # plugins=os imports os (one module) and the run goes on to the next check
    assert "rollout.eval_temperature=-2.0" in run_train(tmp_path, capsys, "plugins=os", "rollout.eval_temperature=-2")


def test_a_plugin_raising_at_import_is_named_with_its_error(tmp_path):
    (tmp_path / "plug").mkdir()
    (tmp_path / "plug" / "boom_plugin.py").write_text("import os\n\nraise RuntimeError('broken on purpose')\n")
    line = assert_one_error(
        run_cli(tmp_path, "plugins=[boom_plugin]", pythonpath=str(tmp_path / "plug")),
        "plugin module 'boom_plugin' (from plugins=[...]) raised RuntimeError: broken on purpose while it was imported",
    )
    assert f"{tmp_path / 'plug' / 'boom_plugin.py'}:3" in line
    (tmp_path / "plug" / "typo_plugin.py").write_text("x = 1\ndef f(:\n    pass\n")
    (tmp_path / "plug" / "own_error_plugin.py").write_text(
        "from framework.errors import ConfigError\n\nraise ConfigError('my_reward is already registered')\n"
    )
    sys.path.insert(0, str(tmp_path / "plug"))
    try:
        with pytest.raises(PluginImportError, match="raised RuntimeError: broken on purpose"):
            import_plugins("boom_plugin")
        typo = "plugin module 'typo_plugin' (from plugins=[...]) raised SyntaxError: invalid syntax while it was "
        typo += f"imported at {tmp_path / 'plug' / 'typo_plugin.py'}:2;"
        with pytest.raises(PluginImportError) as e:
            import_plugins(["typo_plugin"])
        assert str(e.value).startswith(typo), str(e.value)
        with pytest.raises(ConfigError, match="^my_reward is already registered$"):  # a plugin's own user error
            import_plugins(["own_error_plugin"])
    finally:
        sys.path.remove(str(tmp_path / "plug"))


# ----------------------------------------------------------------------------- known with the model or the data
def test_freeze_vision_tower_on_a_text_model(tmp_path, capsys, tiny_text_path, no_weight_loading):
    args = [
        "model=tiny_qwen2",
        "model.name_or_path=tiny:qwen2",
        "data=synthetic_text",
        "model.freeze_vision_tower=true",
    ]
    line = run_train(tmp_path, capsys, *args)
    assert "model.freeze_vision_tower=true but model.name_or_path=tiny:qwen2 is a text-only model" in line


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without a CUDA GPU")
def test_flash_attention_without_a_gpu(tmp_path, capsys, no_weight_loading):
    line = run_train(tmp_path, capsys, "model.attn_implementation=flash_attention_2")
    assert "model.attn_implementation=flash_attention_2 needs a CUDA GPU" in line and "sdpa" in line


def test_prompts_per_step_larger_than_the_train_split_before_the_weights(tmp_path, no_weight_loading):
    data = write_local_data(tmp_path / "data", 3)
    args = ["data=local", f"data.path={data}", "trainer.prompts_per_step=4"]
    needle = "trainer.prompts_per_step=4 is larger than the train split (3 records)"
    assert_one_error(run_cli(tmp_path, *args), needle)
    from framework.train import train

    with pytest.raises(ConfigError, match=r"prompts_per_step=4 is larger than the train split \(3 records\)"):
        train(cfg_for(tmp_path, *args))
    assert (tmp_path / "run" / "data_report.jsonl").exists()  # the data were checked, then the run stopped


def test_a_truncated_safetensors_file_is_named_before_the_weights(tmp_path, tiny_vl_path, no_weight_loading):
    folder = tmp_path / "model"
    shutil.copytree(tiny_vl_path, folder)
    weights = folder / "model.safetensors"
    whole = weights.stat().st_size
    with open(weights, "r+b") as f:
        f.truncate(whole // 2)
    needle = (
        f"model folder '{folder}' has a damaged weight file model.safetensors: it is {whole // 2:,} bytes but its "
        f"header declares {whole:,} (truncated"
    )
    assert_one_error(run_cli(tmp_path, f"model.name_or_path={folder}"), needle)
    from framework.train import train

    with pytest.raises(ModelNotFoundError, match="has a damaged weight file model.safetensors"):
        train(cfg_for(tmp_path, f"model.name_or_path={folder}"))
    weights.write_bytes(b"\x00" * 5)  # not even a header
    from framework.models.loading import check_model_folder

    with pytest.raises(ModelNotFoundError, match="it is 5 bytes and has no valid safetensors header"):
        check_model_folder(folder)


# ----------------------------------------------------------------------------- resume
def test_another_models_state_ckpt_is_one_line(tmp_path, tiny_vl_path, tiny_text_path):
    """The check ``train`` runs before Lightning loads ``state.ckpt`` on resume: a checkpoint
    written for the tiny text model, resumed with the tiny VL model (and the VL model's own one)."""
    import torch

    from framework.models.loading import check_state_matches, load_model

    vl = {f"policy.{k}": v for k, v in load_model(tiny_vl_path).state_dict().items()}
    text = {f"policy.{k}": v for k, v in load_model(tiny_text_path).state_dict().items()}
    torch.save({"state_dict": text, "epoch": 0}, tmp_path / "text.ckpt")
    torch.save({"state_dict": vl, "epoch": 0}, tmp_path / "vl.ckpt")
    check_state_matches(tmp_path / "vl.ckpt", vl, what="resume=x", model="tiny:qwen2_5_vl")  # its own: fine
    with pytest.raises(ConfigError) as e:
        check_state_matches(tmp_path / "text.ckpt", vl, what="resume=runA", model="tiny:qwen2_5_vl")
    msg = str(e.value)
    assert msg.startswith(f"resume=runA: {tmp_path / 'text.ckpt'} holds the weights of another model than ")
    assert "model.name_or_path=tiny:qwen2_5_vl" in msg and "resume with the model" in msg
    only_here = len([k for k in vl if k not in text])
    assert f"{only_here} only here" in msg and "\n" not in msg
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match=r"resume=runA: .*junk\.ckpt cannot be read as a checkpoint"):
        check_state_matches(tmp_path / "junk.ckpt", vl, what="resume=runA", model="tiny:qwen2_5_vl")


@pytest.mark.slow
def test_resuming_with_another_models_state_ckpt_is_one_line(tmp_path, tiny_text_path):
    """End to end: a one-step run whose checkpoint's ``state.ckpt`` is replaced by one of the
    tiny text model (its marker rewritten, so that only the weights are wrong) resumes into one
    ``error:`` line instead of Lightning's load_state_dict traceback."""
    import torch

    from framework.checkpoint import write_marker
    from framework.models.loading import load_model

    run = tmp_path / "run"
    small = ["trainer.prompts_per_step=2", "rollout.group_size=2", "data.train_size=8", "data.test_size=2"]
    small += ["trainer.eval_size=2", "trainer.progress_bar=false"]
    p = run_cli(tmp_path, *small, f"output_dir={run}")
    assert p.returncode == 0, p.stdout + p.stderr
    (ckpt,) = sorted((run / "checkpoints").glob("step-*"))
    state = torch.load(ckpt / "state.ckpt", map_location="cpu", weights_only=True)
    state["state_dict"] = {f"policy.{k}": v for k, v in load_model(tiny_text_path).state_dict().items()}
    torch.save(state, ckpt / "state.ckpt")
    write_marker(ckpt)
    p = run_cli(tmp_path, f"resume={ckpt}", max_steps=2)
    assert_one_error(
        p, f"resume={ckpt}: {ckpt / 'state.ckpt'} holds the weights of another model than model.name_or_path="
    )
