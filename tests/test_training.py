"""End-to-end training on CPU with the tiny real Qwen2.5-VL: the policy learns (held-out
accuracy rises), and a resumed run continues exactly where an interrupted one stopped."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from framework.train import train

CONFIGS = str(Path(__file__).resolve().parents[1] / "configs")


def cfg_for(tmp_path, *overrides):
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        return compose(
            "config",
            overrides=[f"output_dir={tmp_path}", "logger.wandb=false", "trainer.progress_bar=false", *overrides],
        )


# Held-out sampled accuracy (pass@1 at temperature 1.0, 100 questions x 4 samples) of the
# warm-started tiny model is low; 40 RL steps with a 20% learning-rate warm-up (the budget of
# tests/test_baselines.py) take it up by at least twice MARGIN for each algorithm (measured
# values: benchmarks/RESULTS.md, "Learning tests"). On the task and at the temperature those
# were measured on (level-first answers, 1.0, the papers' value): the default run's balanced
# task at 0.7 starts at ~0.55 sampled and dips before it rises, which 40 steps do not show
# (its 80 steps raise the greedy accuracy: README).
MARGIN = 0.05
LEARNING_BUDGET = [
    "rollout.temperature=1.0",
    "data.balanced_answers=false",
    "trainer.max_steps=40",
    "optim.warmup_ratio=0.2",
    "trainer.eval_every=0",
    "trainer.eval_size=100",
    "trainer.eval_samples=4",
]


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["grpo", "grpo_d", "apo"])
def test_training_improves_heldout_accuracy(tmp_path, algorithm):
    res = train(
        cfg_for(
            tmp_path,
            f"algorithm={algorithm}",
            *LEARNING_BUDGET,
        )
    )
    acc = res.metric("eval/accuracy_sampled")
    assert len(acc) == 2, res.history[-1]
    before, after = acc
    print(f"{algorithm}: held-out sampled accuracy {before:.3f} -> {after:.3f}")
    assert after > before + MARGIN
    rewards = res.metric("reward")
    assert sum(rewards[-10:]) / 10 > sum(rewards[:10]) / 10
    # the final checkpoint is a Hugging Face folder that from_pretrained loads
    from transformers import AutoModelForImageTextToText

    AutoModelForImageTextToText.from_pretrained(res.final_checkpoint / "policy")


@pytest.mark.slow
def test_resume_matches_uninterrupted_run(tmp_path):
    """GRPO-D, so the KL schedule's position must survive the restart too."""
    common = [
        "algorithm=grpo_d",
        "trainer.max_steps=4",
        "trainer.prompts_per_step=4",
        "trainer.eval_every=0",
        "trainer.eval_size=8",
        "trainer.save_every=2",
        "rollout.group_size=4",
    ]
    full = train(cfg_for(tmp_path / "full", *common))
    ckpt = tmp_path / "full" / "checkpoints" / "step-000002"
    assert (ckpt / "state.ckpt").exists() and (ckpt / "policy" / "config.json").exists()
    resumed = train(cfg_for(tmp_path / "resumed", *common, f"resume={ckpt}"))
    steps_full = [r for r in full.history if "reward" in r]
    steps_res = [r for r in resumed.history if "reward" in r]
    assert [r["rl_step"] for r in steps_res] == [3.0, 4.0]
    for a, b in zip(steps_full[2:], steps_res):
        for k in ("reward", "loss", "kl", "grad_norm", "completions/mean_length", "beta", "lr"):
            assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-6), k
    assert full.metric("eval/accuracy")[-1] == pytest.approx(resumed.metric("eval/accuracy")[-1])


def test_example_plugin_algorithm_trains_end_to_end(tmp_path, monkeypatch):
    """examples/my_algo registers grpo_len from outside the framework packages."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "examples" / "my_algo"))
    res = train(
        cfg_for(
            tmp_path,
            "plugins=[my_algo]",
            "algorithm.name=grpo_len",
            "+algorithm.length_penalty=0.01",
            "trainer.max_steps=2",
            "trainer.prompts_per_step=4",
            "rollout.group_size=4",
            "trainer.eval_every=0",
            "trainer.eval_size=4",
        )
    )
    rows = [r for r in res.history if "reward" in r]
    assert [r["rl_step"] for r in rows] == [1.0, 2.0]
    # the logged reward is the plugins' weighted sum; the algorithm's shaping shows in the advantages
    assert all("advantages/mean" in r for r in rows)


def _register_nan_algorithm():
    from algorithms.grpo import GRPO
    from framework.registry import ALGORITHMS

    class NaNRewards(GRPO):
        """Test-only: poisons the rewards so the advantages and the loss are NaN."""

        def shape_rewards(self, rollout):
            return rollout.rewards * float("nan")

    ALGORITHMS.register("test_nan", NaNRewards, override=True)


def test_nonfinite_loss_stops_with_step_and_metric_or_skips(tmp_path):
    from framework.module import NonFiniteError

    _register_nan_algorithm()
    common = [
        "algorithm.name=test_nan",
        "trainer.max_steps=2",
        "trainer.prompts_per_step=4",
        "rollout.group_size=4",
        "trainer.eval_every=0",
        "trainer.eval_size=4",
    ]
    with pytest.raises(NonFiniteError, match=r"RL step 0 .*non-finite metric\(s\): .*(loss|policy_loss)"):
        train(cfg_for(tmp_path / "a", *common))
    res = train(cfg_for(tmp_path / "b", *common, "trainer.on_nonfinite=skip"))
    skipped = [r for r in res.history if r.get("nonfinite_skipped")]
    assert skipped and all("grad_norm" not in r for r in skipped)
