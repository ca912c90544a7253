"""The command line and start-up checks: mistakes in the config fail fast, before any model
loads, with a message that names the key and what is allowed, and without a stack trace."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from framework.config import ConfigError
from framework.registry import UnknownNameError
from framework.train import check_early

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = str(ROOT / "configs")


# ------------------------------------------------------------------ CLI (subprocess)
def start_cli(*args, **env) -> subprocess.Popen:
    e = {k: v for k, v in os.environ.items() if k not in ("APO_RL_DEBUG", "HYDRA_FULL_ERROR")}
    e.update(PYTHONPATH=str(ROOT), WANDB_MODE="offline", HF_HUB_OFFLINE="1", **env)
    return subprocess.Popen(
        [sys.executable, "-m", "framework.run", *args],
        cwd=ROOT,
        env=e,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def finish(p: subprocess.Popen, timeout: float = 60) -> tuple[int, str]:
    try:
        out, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        p.communicate()
        raise
    return p.returncode, out


def run_cli(*args, timeout=60, **env):
    return finish(start_cli(*args, **env), timeout)


def test_unknown_algorithm_group_option_lists_available_algorithms(tmp_path):
    # `algorithm=X` selects configs/algorithm/X.yaml: Hydra rejects it while composing, and the
    # CLI turns that into one error line listing the options (exit 2, like every config mistake)
    rc, out = run_cli("algorithm=does_not_exist", f"hydra.run.dir={tmp_path}", timeout=120)
    assert rc == 2, out
    assert "Traceback" not in out
    (line,) = [ln for ln in out.splitlines() if ln.startswith("error:")]
    assert line.startswith("error: no config 'algorithm/does_not_exist'; options of algorithm: "), line
    listed = {name.strip() for name in line.split("options of algorithm: ", 1)[1].split(",")}
    assert {"grpo", "grpo_d", "apo"} <= listed and "base" not in listed, line


def test_unknown_algorithm_name_reaches_registry_error(tmp_path):
    # `algorithm.name=X` composes fine; the algorithm registry rejects the name
    # (both runs at once: each spends most of its time importing torch/lightning; a loaded
    # machine makes that slow, hence the generous limit)
    plain = start_cli("algorithm.name=does_not_exist", f"hydra.run.dir={tmp_path / 'a'}")
    debug = start_cli("algorithm.name=does_not_exist", f"hydra.run.dir={tmp_path / 'b'}", APO_RL_DEBUG="1")
    rc, out = finish(plain, 300)
    rc_debug, out_debug = finish(debug, 300)
    assert rc == 2, out
    assert "Traceback" not in out, out
    assert "unknown algorithm 'does_not_exist'" in out, out
    registered = out.split("Registered algorithms:", 1)[1].split(".", 1)[0]
    assert {"grpo", "grpo_d", "apo"} <= {n.strip() for n in registered.split(",")}, out
    assert "APO_RL_DEBUG=1" in out

    # the hint is true: with APO_RL_DEBUG=1 the same error comes with its traceback
    assert rc_debug != 0
    assert "Traceback" in out_debug and "UnknownNameError" in out_debug, out_debug


def test_cfg_job_prints_composed_config():
    rc, out = run_cli("algorithm=apo", "model=qwen2_5_vl_3b", "--cfg", "job", timeout=30)
    assert rc == 0, out
    assert "Qwen/Qwen2.5-VL-3B-Instruct" in out
    assert "dads" in out and "stcr" in out
    assert "name: apo" in out


# ------------------------------------------------------------------ start-up checks (compose API)
def compose_cfg(*overrides):
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        return compose("config", overrides=["output_dir=/tmp/x", *overrides])


@pytest.mark.parametrize("algorithm", ["grpo", "grpo_d", "apo"])
def test_shipped_configs_pass_early_checks(algorithm):
    early = check_early(compose_cfg(f"algorithm={algorithm}"))
    assert early["algorithm"].cfg.name == algorithm
    assert {"rollout", "trainer", "model", "optim", "logger"} <= set(early["sections"])


@pytest.mark.parametrize("value", ["-1", "1"])
def test_group_size_too_small(value):
    with pytest.raises(ConfigError, match=r"rollout\.group_size") as ei:
        check_early(compose_cfg(f"rollout.group_size={value}"))
    assert ">= 2" in str(ei.value)


def test_unknown_key_names_it_and_lists_allowed_keys():
    with pytest.raises(ConfigError, match=r"trainer\.foo") as ei:
        check_early(compose_cfg("+trainer.foo=1"))
    msg = str(ei.value)
    for k in ("max_steps", "prompts_per_step", "micro_batch_size", "eval_every"):
        assert k in msg, msg


def test_wrong_type_names_key():
    with pytest.raises(ConfigError, match=r"trainer\.max_steps") as ei:
        check_early(compose_cfg("trainer.max_steps=abc"))
    assert "abc" in str(ei.value)


def test_bad_enum_lists_allowed_values():
    with pytest.raises(ConfigError, match=r"optim\.scheduler") as ei:
        check_early(compose_cfg("optim.scheduler=banana"))
    msg = str(ei.value)
    assert "banana" in msg
    for v in ("constant", "cosine", "linear"):
        assert v in msg, msg


def test_bad_algorithm_option_names_it():
    with pytest.raises(ValueError, match=r"algorithm\.loss_agg") as ei:
        check_early(compose_cfg("algorithm.loss_agg=nope"))
    msg = str(ei.value)
    assert "nope" in msg
    for v in ("seq_mean_token_mean", "token_mean", "seq_mean_token_sum_norm"):
        assert v in msg, msg


def test_unknown_reward_plugin_lists_registered_rewards():
    with pytest.raises(UnknownNameError) as ei:
        check_early(compose_cfg("+reward.components.nope.weight=1"))
    msg = str(ei.value)
    assert "'nope'" in msg
    assert "accuracy" in msg and "format" in msg, msg


def test_unsupported_model_dtype():
    with pytest.raises(ConfigError, match=r"model\.dtype") as ei:
        check_early(compose_cfg("model.dtype=int8"))
    msg = str(ei.value)
    assert "int8" in msg and "bfloat16" in msg and "float32" in msg


# ------------------------------------------------------------------ model paths
def test_missing_hub_model_says_how_to_use_a_local_copy(monkeypatch):
    import huggingface_hub.constants

    from framework.models.loading import ModelNotFoundError, resolve_path

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads the variable at import time
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelNotFoundError) as ei:
        resolve_path("Org/does-not-exist-model")
    msg = str(ei.value)
    assert "Org/does-not-exist-model" in msg
    assert "model.name_or_path=" in msg
    assert "Traceback" not in msg


def test_missing_local_model_path(tmp_path):
    from framework.models.loading import ModelNotFoundError, resolve_path

    with pytest.raises(ModelNotFoundError, match="/nonexistent/model.*does not exist"):
        resolve_path("/nonexistent/model")
    with pytest.raises(ModelNotFoundError, match="config.json"):  # a folder that is not a model
        resolve_path(str(tmp_path))


def test_fsdp_trainer_config_composes_with_its_defaults():
    t = check_early(compose_cfg("trainer=fsdp", "trainer.devices=8"))["sections"]["trainer"]
    assert (t.strategy, t.devices, t.fsdp.mixed_precision, t.fsdp.activation_checkpointing, t.fsdp.cpu_offload) == (
        "fsdp",
        8,
        "bf16",
        True,
        False,
    )
    assert t.eval_every == 10  # the rest comes from trainer/default.yaml


def test_fsdp_options_are_checked():
    with pytest.raises(ConfigError, match=r"trainer\.fsdp\.mixed_precision") as ei:
        check_early(compose_cfg("trainer=fsdp", "trainer.fsdp.mixed_precision=fp8"))
    assert "bf16" in str(ei.value)
    with pytest.raises(ConfigError, match=r"fsdp\.foo"):
        check_early(compose_cfg("trainer=fsdp", "+trainer.fsdp.foo=1"))
    with pytest.raises(ConfigError, match=r"trainer\.devices"):
        check_early(compose_cfg("trainer=fsdp", "trainer.devices=auto"))
    with pytest.raises(ConfigError, match=r"trainer\.fsdp\.mixed_precision=bf16"):
        check_early(compose_cfg("trainer=fsdp", "trainer.precision=bf16-mixed"))
