"""Published recipes as one override (configs/experiment/): every experiment composes, passes the
start-up checks and holds the sources' values; ``framework.recipes`` lists where a run departs
from its algorithm's recipe; the `view_r1_3b` suite runs the experiment unchanged but for the
switch each entry names. Fast: nothing is trained and no model loads.

The expected values below are written from the sources (../shared/specs/algorithms.md,
"Published recipes"), not read back from the config files or from framework/recipes.py."""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from algorithms.base import build_algorithm
from framework.config import validate_run_config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = str(ROOT / "configs")
EXPERIMENTS = ["view_r1_3b", "othink_mr1_counting", "othink_mr1_geometry", "grpo_r1v"]

# R1-V / OThink-MR1 (Qwen2-VL-2B): G 8, lr 1e-6, 256 new tokens, temperature 1.0, bf16 compute with
# fp32 masters, accuracy + 1.0 x format, one update per rollout, seq_mean_token_mean; per-device
# batch 1 prompt x 2 accumulation steps x 8 GPUs = 16 prompts per rollout.
_R1V = {
    "model.name_or_path": "Qwen/Qwen2-VL-2B-Instruct",
    "model.dtype": "bfloat16",
    "model.master_dtype": "float32",
    "rollout.group_size": 8,
    "rollout.temperature": 1.0,
    "rollout.max_new_tokens": 256,
    "optim.lr": 1e-6,
    "reward.components.accuracy.weight": 1.0,
    "reward.components.format.weight": 1.0,
    "reward.correctness": "accuracy",
    "algorithm.loss_agg": "seq_mean_token_mean",
    "algorithm.kl.estimator": "k3",
    "algorithm.ppo_epochs": 1,
    "trainer.num_mini_batches": 1,
    "trainer.prompts_per_step": 1 * 2 * 8,
    "trainer.accelerator": "gpu",
    "trainer.devices": 8,
}

EXPECTED = {
    "view_r1_3b": {
        "model.name_or_path": "Qwen/Qwen2.5-VL-3B-Instruct",
        "model.dtype": "bfloat16",
        "model.master_dtype": "float32",
        "model.gradient_checkpointing": True,
        "algorithm.name": "apo",
        "algorithm.kl.estimator": "k3",
        "algorithm.kl.coef": 1e-3,
        "algorithm.kl.schedule.name": "constant",
        "algorithm.clip_low": 0.2,
        "algorithm.clip_high": 0.2,
        "algorithm.ppo_epochs": 1,
        "algorithm.loss_agg": "token_mean",
        "algorithm.kl_agg": "seq_mean_token_mean",
        "algorithm.advantage.scale": "group",
        "algorithm.dads.enabled": True,
        "algorithm.dads.variant": "release",
        "algorithm.stcr.enabled": True,
        "algorithm.stcr.lam": 1.00001,
        "algorithm.stcr.only_negative_advantage": False,  # the release's behaviour
        "rollout.engine": "vllm",
        "rollout.group_size": 8,
        "rollout.temperature": 1.0,
        "rollout.top_p": 1.0,
        "rollout.top_k": 0,
        "rollout.max_new_tokens": 4096,
        "rollout.gpu_memory_utilization": 0.5,
        "rollout.sleep": True,
        "data.max_prompt_tokens": 9216,
        "data.hub_id": "FanqingM/MMK12",  # the stated assumption
        "optim.lr": 1e-6,
        "optim.betas": [0.9, 0.95],
        "optim.weight_decay": 0.0,
        "optim.scheduler": "cosine",
        "optim.min_lr_ratio": 0.1,
        "optim.warmup_ratio": 0.03,
        "optim.grad_clip": 1.0,
        "reward.components.accuracy.weight": 1.0,
        "reward.components.format.weight": 0.5,
        "reward.correctness": "accuracy",
        "trainer.prompts_per_step": 128,
        "trainer.num_mini_batches": 16,
        "trainer.max_steps": 20_000 * 2 // 128,
        "trainer.accelerator": "gpu",
        "trainer.devices": 8,
        "trainer.strategy": "fsdp",
        "trainer.fsdp.mixed_precision": "bf16",
    },
    "othink_mr1_counting": {
        **_R1V,
        "algorithm.name": "grpo_d",
        "algorithm.kl.schedule.name": "grpo_d",
        "algorithm.kl.schedule.beta_min": 0.04,
        "algorithm.kl.schedule.beta_max": 0.10,
        "algorithm.kl.schedule.explore_frac": 0.3,
        "data.hub_id": "leonardPKU/clevr_cogen_a_train",
    },
    "othink_mr1_geometry": {
        **_R1V,
        "algorithm.name": "grpo_d",
        "algorithm.kl.schedule.name": "grpo_d",
        "algorithm.kl.schedule.beta_min": 0.0,
        "algorithm.kl.schedule.beta_max": 0.02,
        "algorithm.kl.schedule.explore_frac": 0.3,
        "data.hub_id": "leonardPKU/GEOQA_R1V_Train_8K",
    },
    "grpo_r1v": {
        **_R1V,
        "algorithm.name": "grpo",
        "algorithm.kl.coef": 0.04,
        "algorithm.kl.schedule.name": "constant",
        "data.hub_id": "leonardPKU/clevr_cogen_a_train",
    },
}

# values the sources do not state: their line in the experiment file must say "inferred"
INFERRED = {
    "view_r1_3b": ["micro_batch_size", "max_model_len", "eps: 1.0e-8", "freeze_vision_tower"],
    "othink_mr1_counting": ["max_steps", "prompts_per_step", "scheduler", "betas", "master_dtype"],
    "othink_mr1_geometry": ["max_steps", "prompts_per_step", "scheduler", "betas", "master_dtype"],
    "grpo_r1v": ["max_steps", "prompts_per_step", "scheduler", "betas", "master_dtype"],
}


@pytest.fixture(scope="module")
def hydra_dir():
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        yield


def _compose(*overrides):
    return compose("config", overrides=list(overrides))


def _same(a, b) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=1e-12, abs_tol=1e-15)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def _select(cfg, key):
    v = OmegaConf.select(cfg, key, throw_on_missing=True)
    return OmegaConf.to_container(v, resolve=True) if OmegaConf.is_config(v) else v


# ----------------------------------------------------------------------------- composition
def test_every_experiment_file_is_tested():
    files = sorted(p.stem for p in (ROOT / "configs" / "experiment").glob("*.yaml"))
    assert files == sorted(EXPERIMENTS) == sorted(EXPECTED)


def test_the_main_config_composes_without_an_experiment(hydra_dir):
    cfg = _compose()
    assert "experiment" not in cfg
    assert cfg.algorithm.name == "grpo" and cfg.model.name_or_path == "tiny:qwen2_5_vl-sft"
    validate_run_config(cfg)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_composes_and_passes_the_start_up_checks(hydra_dir, name):
    cfg = _compose(f"experiment={name}")
    sections = validate_run_config(cfg)
    algo_cfg = OmegaConf.to_container(cfg.algorithm, resolve=True)
    build_algorithm(algo_cfg, total_steps=1)
    t = sections["trainer"]
    total = t.max_steps * t.num_mini_batches * algo_cfg["ppo_epochs"]
    algo = build_algorithm(algo_cfg, total_steps=total)
    assert algo.needs_reference  # every recipe keeps the KL term (GRPO-D even while beta is 0)
    # prompts are sharded by rank as whole groups, and mini-batches do not split groups
    assert t.prompts_per_step % t.devices == 0
    assert (t.prompts_per_step // t.devices) % t.num_mini_batches == 0
    # vLLM's context holds the longest prompt and completion
    r = sections["rollout"]
    assert r.max_model_len >= cfg.data.max_prompt_tokens + r.max_new_tokens


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_values_match_the_sources(hydra_dir, name):
    cfg = _compose(f"experiment={name}")
    wrong = {
        key: (_select(cfg, key), want) for key, want in EXPECTED[name].items() if not _same(_select(cfg, key), want)
    }
    assert not wrong, f"{name}: key -> (config, source): {wrong}"


def test_view_r1_3b_batch_and_schedule_arithmetic(hydra_dir):
    cfg = _compose("experiment=view_r1_3b")
    t, r, o = cfg.trainer, cfg.rollout, cfg.optim
    assert t.prompts_per_step * r.group_size == 1024  # completions per rollout
    assert t.prompts_per_step * r.group_size // t.num_mini_batches == 64  # per optimizer step
    assert o.lr * o.min_lr_ratio == pytest.approx(1e-7)  # cosine down to 1e-7
    updates = t.max_steps * t.num_mini_batches
    assert updates == 4992  # "~5,000 optimizer steps"
    assert int(o.warmup_ratio * updates) == pytest.approx(150, abs=1)  # "150 of ~5,000"


def test_grpo_d_experiments_schedule_beta_as_the_paper(hydra_dir):
    for name, (lo, hi) in {"othink_mr1_counting": (0.04, 0.10), "othink_mr1_geometry": (0.0, 0.02)}.items():
        cfg = _compose(f"experiment={name}")
        algo = build_algorithm(OmegaConf.to_container(cfg.algorithm, resolve=True), total_steps=1000)
        assert algo.beta(0) == pytest.approx((lo + hi) / 2)
        assert algo.beta(300) == pytest.approx(lo)  # the end of the 30% exploration
        assert algo.beta(1000) == pytest.approx(hi)


def test_grpo_r1v_is_othink_counting_with_a_constant_beta(hydra_dir):
    base = OmegaConf.to_container(_compose("experiment=othink_mr1_counting"), resolve=False)
    grpo = OmegaConf.to_container(_compose("experiment=grpo_r1v"), resolve=False)
    assert grpo["data"] == base["data"]
    for section in ("model", "rollout", "optim", "trainer", "reward"):
        assert grpo[section] == base[section], section
    kl = grpo["algorithm"]["kl"]
    assert (kl["estimator"], kl["coef"], kl["schedule"]["name"]) == ("k3", 0.04, "constant")
    assert kl.get("sample_weight", "none") == "none"  # no per-sample shaping of beta


def _value_lines(text: str):
    prev = ""
    for i, line in enumerate(text.splitlines(), 1):
        s = line.strip()
        if s and not s.startswith("#") and re.match(r"^[A-Za-z_]+:\s*[^\s#]", s):
            yield i, line, prev
        if s:
            prev = line


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_value_has_its_source_in_a_comment(name):
    text = (ROOT / "configs" / "experiment" / f"{name}.yaml").read_text()
    assert text.startswith("# @package _global_\n")
    assert re.search(r"^defaults:\n(  - override /\w+: \w+.*\n)+", text, re.M)
    bare = [f"{i}: {ln}" for i, ln, prev in _value_lines(text) if "#" not in ln and not prev.strip().startswith("#")]
    assert not bare, f"values without a source comment in {name}.yaml:\n" + "\n".join(bare)
    for key in INFERRED[name]:
        lines = [ln for _, ln, _ in _value_lines(text) if ln.strip().startswith(key)]
        assert lines, key
        i = text.splitlines().index(lines[0])
        around = "\n".join(text.splitlines()[max(0, i - 3) : i + 2])  # the line or its comment block
        assert "inferred" in around, f"{name}: {key} is inferred; its comment must say so:\n{around}"


def test_experiment_runs_from_the_command_line():
    p = subprocess.run(
        [sys.executable, "-m", "framework.run", "experiment=view_r1_3b", "--cfg", "job"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 0, p.stdout + p.stderr
    job = OmegaConf.create(p.stdout)
    assert job.rollout.max_new_tokens == 4096 and job.algorithm.name == "apo"


# ----------------------------------------------------------------------------- framework.recipes
def test_recipe_differences_of_apo_on_the_default_config(hydra_dir):
    from framework.recipes import recipe_differences, recipe_note

    diffs = recipe_differences(_compose("algorithm=apo"))
    keys = [d.split("=", 1)[0] for d in diffs]
    assert {"reward.components.format.weight", "optim.betas", "optim.scheduler"} <= set(keys), diffs
    assert "optim.betas=[0.9, 0.999] (APO recipe: [0.9, 0.95])" in diffs
    assert "reward.components.format.weight=1.0 (APO recipe: 0.5)" in diffs
    assert "optim.scheduler=constant (APO recipe: cosine)" in diffs
    assert "algorithm.kl.coef" not in keys and "rollout.group_size" not in keys  # these agree
    assert recipe_note(_compose("algorithm=apo")).startswith("APO recipe differs in: ")


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_the_experiments_are_their_algorithms_recipe(hydra_dir, name):
    from framework.recipes import recipe_differences, recipe_note

    cfg = _compose(f"experiment={name}")
    assert recipe_differences(cfg) == []
    assert recipe_note(cfg) is None


def test_recipe_differences_name_each_changed_key(hydra_dir):
    from framework.recipes import recipe_differences

    cfg = _compose("experiment=view_r1_3b", "algorithm.kl.coef=0.01", "rollout.group_size=16")
    assert recipe_differences(cfg) == [
        "algorithm.kl.coef=0.01 (APO recipe: 0.001)",
        "rollout.group_size=16 (APO recipe: 8)",
    ]
    cfg = _compose("experiment=othink_mr1_counting", "~reward.components.format")
    assert recipe_differences(cfg) == ["reward.components.format.weight=<unset> (GRPO-D recipe: 1.0)"]
    assert recipe_differences(_compose("algorithm.name=my_plugin_algo")) == []  # no recipe: nothing to say
    assert recipe_differences({"algorithm": {"name": "apo"}, "optim": {"lr": 1e-6}})  # plain dicts too


# ----------------------------------------------------------------------------- the view_r1_3b suite
@pytest.fixture(scope="module")
def suite_runs(hydra_dir, tmp_path_factory):
    from benchmarks.run import plan, suite_dict

    s = suite_dict(compose("benchmark", overrides=["suite=view_r1_3b"]))
    return s, plan(s, tmp_path_factory.mktemp("sweep"))


SWITCHES = {  # entry -> (dads.enabled, stcr.enabled)
    "apo": (True, True),
    "apo_no_dads": (False, True),
    "apo_no_stcr": (True, False),
    "grpo": (False, False),  # GRPO = the recipe with both switched off
}
PER_RUN = ("seed", "logger", "output_dir")  # what the runner sets per run


def test_view_r1_3b_suite_grid(suite_runs):
    s, runs = suite_runs
    assert sorted(s["algorithms"]) == sorted(SWITCHES)
    assert s["steps"] == EXPECTED["view_r1_3b"]["trainer.max_steps"]
    assert len(runs) == len(s["tasks"]) * len(SWITCHES) * len(s["seeds"])
    for r in runs:
        assert "experiment=view_r1_3b" in r.command


def test_view_r1_3b_suite_runs_are_the_experiment_but_for_their_switch(hydra_dir, suite_runs):
    _, runs = suite_runs
    ref = OmegaConf.to_container(_compose("experiment=view_r1_3b"), resolve=False)
    ref["trainer"]["progress_bar"] = False  # the runner's, cosmetic
    for r in runs:
        overrides = [o for o in r.command[3:] if not o.startswith("hydra.")]
        cfg = _compose(*overrides)
        validate_run_config(cfg)
        build_algorithm(OmegaConf.to_container(cfg.algorithm, resolve=True), total_steps=1)
        dads, stcr = SWITCHES[r.algorithm]
        assert (cfg.algorithm.dads.enabled, cfg.algorithm.stcr.enabled) == (dads, stcr), r.name
        got = OmegaConf.to_container(cfg, resolve=False)
        got["algorithm"]["dads"]["enabled"] = ref["algorithm"]["dads"]["enabled"]
        got["algorithm"]["stcr"]["enabled"] = ref["algorithm"]["stcr"]["enabled"]
        for k in PER_RUN:
            got.pop(k, None)
        assert got == {k: v for k, v in ref.items() if k not in PER_RUN}, r.name
        assert cfg.seed == r.seed


def test_view_r1_3b_suite_dry_run_prints_the_commands(tmp_path):
    p = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "suite=view_r1_3b", "dry_run=true", f"sweep_dir={tmp_path}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 0, p.stdout + p.stderr
    lines = [ln for ln in p.stdout.splitlines() if " -m framework.run " in ln]
    assert len(lines) == len(SWITCHES) * 3, p.stdout
    assert all("experiment=view_r1_3b" in ln for ln in lines)
    assert not list(tmp_path.glob("*/*/seed*"))  # nothing ran
