"""Real runs mean what they say, on the paths a researcher takes to real scale: bf16 compute
keeps fp32 master weights (at the papers' learning rate the model moves), several optimizer
steps per rollout are clipped, the number of optimizer steps per rollout is exact, a
real-size model never trains on the CPU by accident, and every default lives in one place."""

import csv
import dataclasses
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from framework.config import ConfigError
from framework.train import check_early, train

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = str(ROOT / "configs")
SMALL = [
    "trainer.prompts_per_step=4",
    "rollout.group_size=4",
    "rollout.max_new_tokens=8",
    "trainer.eval_every=0",
    "trainer.eval_size=4",
    "logger.wandb=false",
    "trainer.progress_bar=false",
]


def _cfg(tmp_path, *overrides):
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        return compose("config", overrides=[f"output_dir={tmp_path}", *SMALL, *overrides])


def _changed_fraction(ckpt: Path) -> tuple[float, torch.dtype]:
    """Fraction of the trained (master) weights in state.ckpt that differ from the initial ones."""
    from transformers import AutoModelForImageTextToText

    from framework.models.loading import resolve_path

    st = torch.load(ckpt / "state.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    trained = {k.removeprefix("policy."): v for k, v in st.items() if k.startswith("policy.")}
    init = AutoModelForImageTextToText.from_pretrained(resolve_path("tiny:qwen2_5_vl-sft")).state_dict()
    n = changed = 0
    for k, v in trained.items():
        n += v.numel()
        changed += int((v != init[k].to(v.dtype)).sum())
    return changed / n, next(iter(trained.values())).dtype


@pytest.mark.slow
def test_bf16_compute_keeps_fp32_master_weights(tmp_path):
    """lr 1e-6, 10 optimizer steps (5 RL steps x 2 mini-batches), bf16 compute: with the fp32
    master copy (the default) nearly every weight moves; pure bf16 (asked for by name) loses
    almost every update to rounding, which is why it is not the default."""
    common = ["model.dtype=bfloat16", "optim.lr=1e-6", "trainer.max_steps=5", "trainer.num_mini_batches=2"]
    mixed = train(_cfg(tmp_path / "mixed", *common))
    frac, dtype = _changed_fraction(mixed.final_checkpoint)
    assert dtype == torch.float32 and frac >= 0.99, frac
    # the export is in the compute dtype (model.export_dtype defaults to model.dtype)
    from safetensors.torch import load_file

    exported = load_file(str(mixed.final_checkpoint / "policy" / "model.safetensors"))
    assert {v.dtype for v in exported.values() if v.is_floating_point()} == {torch.bfloat16}

    pure = train(_cfg(tmp_path / "pure", *common, "model.master_dtype=bfloat16"))
    frac_pure, dtype = _changed_fraction(pure.final_checkpoint)
    assert dtype == torch.bfloat16 and frac_pure < 0.10, frac_pure


@pytest.mark.slow
def test_fsdp_bf16_keeps_fp32_master_weights(tmp_path):
    """The same under 2-process FSDP with trainer.fsdp.mixed_precision=bf16 and model.dtype=bfloat16."""
    import os
    import subprocess
    import sys

    out = tmp_path / "fsdp"
    args = [
        *SMALL,
        "trainer=fsdp",
        "trainer.devices=2",
        "trainer.accelerator=cpu",
        "trainer.fsdp.mixed_precision=bf16",
        "trainer.fsdp.sharded_checkpoint=false",
        "trainer.fsdp.activation_checkpointing=false",
        "model.dtype=bfloat16",
        "optim.lr=1e-6",
        "trainer.max_steps=5",
        "trainer.num_mini_batches=2",
        f"output_dir={out}",
        f"hydra.run.dir={out}",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "offline"}
    p = subprocess.run(
        [sys.executable, "-m", "framework.run", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900
    )
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    frac, dtype = _changed_fraction(out / "checkpoints" / "step-000005")
    assert dtype == torch.float32 and frac >= 0.99, frac


def test_several_updates_per_rollout_are_clipped_in_the_trainer(tmp_path):
    """num_mini_batches=2: the second optimizer step of each rollout is off-policy; the trainer
    takes the rollout policy's log-probs before the first, so the clip binds (clip_ratio > 0)
    once the first step moved the policy (lr 1e-2 on the tiny model)."""
    res = train(
        _cfg(
            tmp_path,
            "trainer.max_steps=2",
            "trainer.num_mini_batches=2",
            "optim.lr=1e-2",
            "algorithm.kl.coef=0.0",
            "rollout.max_new_tokens=24",  # room for a well-formed answer: rewards (and advantages) differ
        )
    )
    rows = [r for r in res.history if "reward" in r]
    assert all("timing_s/old_logp" in r for r in rows)  # taken once per rollout, before the first step
    assert len(rows) == 2 and rows[0]["advantages/std"] > 0
    assert rows[0]["clip_ratio"] > 0, rows[0]["clip_ratio"]  # was 0.000: the second step ran unclipped
    st = torch.load(res.final_checkpoint / "state.ckpt", map_location="cpu", weights_only=True)
    assert st["global_step"] == 4  # exactly 2 optimizer steps per RL step


def test_dapo_refills_still_make_exactly_num_mini_batches_steps(tmp_path):
    res = train(
        _cfg(
            tmp_path,
            "algorithm=dapo",
            "trainer.max_steps=2",
            "trainer.num_mini_batches=2",
            "algorithm.filter_groups.max_extra_rounds=1",
        )
    )
    rows = [r for r in res.history if "reward" in r]
    assert all("filter_groups/extra_rounds" in r for r in rows)
    st = torch.load(res.final_checkpoint / "state.ckpt", map_location="cpu", weights_only=True)
    assert st["global_step"] == 2 * 2
    lines = list(csv.DictReader((tmp_path / "csv" / "metrics.csv").read_text().splitlines()))
    assert [float(r["rl_step"]) for r in lines if r.get("reward")] == [1.0, 2.0]


def test_uneven_mini_batches_fail_at_start_with_the_numbers(tmp_path):
    with pytest.raises(ConfigError, match=r"prompts_per_step=6 .*num_mini_batches=4"):
        check_early(_cfg(tmp_path, "trainer.prompts_per_step=6", "trainer.num_mini_batches=4"))
    # 8 prompts over 2 ranks: 4 groups per rank do not split into 8 mini-batches
    with pytest.raises(ConfigError, match=r"over 2 rank\(s\) gives 4 prompt groups per rank.*multiple of 16"):
        check_early(_cfg(tmp_path, "trainer=ddp", "trainer.prompts_per_step=8", "trainer.num_mini_batches=8"))


def test_a_real_size_model_does_not_train_on_the_cpu_by_accident(tmp_path, monkeypatch):
    """model=qwen2_5_vl_3b alone: bf16 compute with fp32 masters, a real completion budget, and
    on a machine without a GPU a one-line stop before any weight loads (naming the recipe)."""
    cfg = _cfg(tmp_path, "model=qwen2_5_vl_3b")
    s = check_early(cfg)["sections"]
    assert (s["model"].dtype, s["model"].master_dtype, s["trainer"].precision) == ("bfloat16", "float32", "bf16-mixed")
    assert s["rollout"].max_new_tokens == 8  # SMALL overrides it; alone it is:
    alone = _cfg(tmp_path, "model=qwen2_5_vl_3b", "rollout.max_new_tokens=1024")
    assert check_early(alone)["sections"]["rollout"].max_new_tokens == 1024
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        bare = compose("config", overrides=["model=qwen2_5_vl_3b"])
    assert bare.rollout.max_new_tokens == 1024 and bare.trainer.accelerator == "auto"

    # a folder with a 3B-shaped config (no weights are needed to refuse it)
    from transformers import AutoConfig

    import framework.train as tr

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(AutoConfig, "from_pretrained", lambda p: tr_config_3b())
    with pytest.raises(ConfigError, match=r"3\.\d+B parameters and this machine has no GPU.*experiment=view_r1_3b"):
        tr._check_device_for_model("/models/Qwen2.5-VL-3B-Instruct", s)
    by_name = {**s, "trainer": dataclasses.replace(s["trainer"], accelerator="cpu")}  # the sections are frozen
    tr._check_device_for_model("/models/Qwen2.5-VL-3B-Instruct", by_name)  # asked for by name: allowed


def tr_config_3b():
    from framework.models.architectures import get

    return get("qwen2_5_vl_3b")


def test_precision_is_derived_from_the_dtypes_and_checked(tmp_path):
    s = check_early(_cfg(tmp_path))["sections"]
    assert s["trainer"].precision == "32-true"
    s = check_early(_cfg(tmp_path, "model.dtype=bfloat16", "model.master_dtype=bfloat16"))["sections"]
    assert s["trainer"].precision == "32-true"  # pure bf16: the weights are already bf16
    with pytest.raises(ConfigError, match=r"trainer.precision='bf16-mixed' disagrees with model.dtype=float32"):
        check_early(_cfg(tmp_path, "trainer.precision=bf16-mixed"))
    with pytest.raises(ConfigError, match=r"model.master_dtype=bfloat16 is narrower"):
        check_early(_cfg(tmp_path, "model.master_dtype=bfloat16"))


# one source of truth (every group option, restated defaults, code defaults): tests/test_config_sources.py
