"""An algorithm plugin written from README alone: the README's worked example runs and gives
the advantages a float64 hand computation gives, and a plugin whose hooks do not match the
interface stops at start (before any model loads) naming the hook and the expected signature."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from algorithms.base import Algorithm, build_algorithm
from algorithms.grpo import GRPO
from algorithms.hooks import check_hooks
from framework.errors import ConfigError
from framework.registry import ALGORITHMS
from framework.types import Rollout

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _readme_example() -> str:
    section = README.split("### Writing an algorithm", 1)[1]
    (code,) = re.findall(r"A complete example.*?```python\n(.*?)```", section, flags=re.S)
    return code


def _rollout(rewards: list[float], group: int) -> Rollout:
    n = len(rewards)
    return Rollout(
        completion_ids=torch.ones(n, 3, dtype=torch.long),
        completion_mask=torch.ones(n, 3),
        group_ids=torch.arange(n) // group,
        rewards=torch.tensor(rewards),
        correct=torch.tensor([1.0 if r > 0 else 0.0 for r in rewards]),
        truncated=torch.zeros(n, dtype=torch.bool),
    )


def test_the_readme_example_runs_and_clips_the_advantages():
    module = types.ModuleType("readme_algorithm_example")
    if "grpo_clipped_adv" in ALGORITHMS:  # a second run in this process: replace the registration
        ALGORITHMS._items.pop("grpo_clipped_adv")
    sys.modules[module.__name__] = module  # dataclasses look their module up there
    try:
        exec(compile(_readme_example(), "README.md", "exec"), module.__dict__)
    finally:
        del sys.modules[module.__name__]
    algo = build_algorithm({"name": "grpo_clipped_adv", "clip": 0.5, "kl": {"coef": 0.0}}, total_steps=10)
    rewards = [1.0, 0.0, 0.0, 0.0, 2.0, 1.0, 1.0, 1.0]
    ro = _rollout(rewards, group=4)
    prepared = algo.prepare(ro, step=0)
    metrics = prepared.metrics
    # by hand: group-normalised (unbiased std, eps 1e-4), then clamped to [-0.5, 0.5]
    expected = []
    for g in range(2):
        r = rewards[4 * g : 4 * g + 4]
        mean = sum(r) / 4
        std = math.sqrt(sum((x - mean) ** 2 for x in r) / 3)
        expected += [max(-0.5, min(0.5, (x - mean) / (std + 1e-4))) for x in r]
    assert prepared.advantages.tolist() == pytest.approx(expected, abs=1e-6)
    # the unclipped values are 1.5 and -0.5 (x3) per group: two of eight exceed the clip
    assert metrics["advantages/clipped_frac"] == pytest.approx(2 / 8)


def test_a_hook_with_the_wrong_signature_is_named_with_the_expected_one():
    class Wrong(Algorithm):
        def shape_advantages(self, rollout):  # the natural guess; the trainer passes 3 arguments
            return rollout.rewards

    with pytest.raises(ConfigError) as e:
        check_hooks(Wrong, Algorithm)
    msg = str(e.value)
    assert "hook shape_advantages(self, rollout) does not match the interface" in msg
    assert "interface shape_advantages(self, rollout: Rollout, advantages: Tensor, metrics: dict) -> Tensor;" in msg


def test_a_misspelt_hook_is_reported():
    class Typo(Algorithm):
        def shape_reward(self, rollout):
            pass

    with pytest.raises(ConfigError, match=r"method shape_reward is not a hook .* did you mean shape_rewards"):
        check_hooks(Typo, Algorithm)


def test_a_hook_that_returns_nothing_is_named():
    """shape_rewards returns the new rewards: a plugin written against the old, in-place hook is
    refused at start (annotated -> None) or at its first call (returning None), naming the hook."""

    class InPlace(Algorithm):
        def shape_rewards(self, rollout) -> None:
            rollout.rewards = rollout.rewards * 2

    with pytest.raises(ConfigError, match=r"hook shape_rewards\(self, rollout\) -> None returns nothing"):
        check_hooks(InPlace, Algorithm)

    class Unannotated(GRPO):
        def shape_rewards(self, rollout):
            pass

    check_hooks(Unannotated, Algorithm)
    algo = Unannotated(GRPO.Config(), total_steps=1)
    with pytest.raises(
        ConfigError, match=r"Unannotated: shape_rewards returned NoneType; it returns the shaped rewards"
    ):
        algo.prepare(_rollout([1.0, 0.0], group=2), step=0)


def test_compatible_overrides_pass():
    class Fine(Algorithm):
        def shape_advantages(self, rollout, advantages, metrics, extra=1.0):  # an extra optional parameter
            return advantages

        def sample_kl_coef(self, *args):
            return super().sample_kl_coef(*args)

        def helper(self):  # a method of its own, not named like a hook
            return 1

    check_hooks(Fine, Algorithm)


def test_a_mismatched_plugin_stops_the_run_before_any_model_loads(tmp_path):
    (tmp_path / "bad_algo.py").write_text(
        "from algorithms.grpo import GRPO, AlgorithmConfig\n"
        "from framework.registry import ALGORITHMS\n"
        "from dataclasses import dataclass\n\n"
        "@dataclass\nclass C(AlgorithmConfig):\n    name: str = 'bad_algo'\n\n"
        "@ALGORITHMS.register('bad_algo')\nclass Bad(GRPO):\n    Config = C\n\n"
        "    def shape_advantages(self, rollout):\n        return rollout.rewards\n"
    )
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "framework.run",
            "plugins=[bad_algo]",
            "algorithm.name=bad_algo",
            f"output_dir={tmp_path / 'run'}",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(tmp_path), "WANDB_MODE": "disabled"},
    )
    assert r.returncode == 2, r.stderr[-2000:]
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "hook shape_advantages(self, rollout) does not match" in errors[0], r.stderr
    assert "Traceback" not in r.stderr
    assert "memory budget" not in r.stdout  # stopped before the model was even looked at
