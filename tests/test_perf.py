"""Per-step timings and throughput (issue 17): every phase of the RL step is timed and logged,
the phases fit inside the step, and the throughput numbers follow from the step's token counts
and times (perf/throughput: all tokens / step time, the verl / EasyR1 definition)."""

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from framework.metrics import PHASES, peak_flops, step_perf
from framework.types import Rollout

CONFIGS = str(Path(__file__).resolve().parents[1] / "configs")
SMALL = [
    "trainer.max_steps=2",
    "trainer.prompts_per_step=2",
    "rollout.group_size=2",
    "rollout.max_new_tokens=8",
    "trainer.eval_every=0",
    "trainer.eval_size=2",
    "data.train_size=8",
    "data.test_size=4",
    "trainer.save_every=0",
]


def cfg_for(tmp_path, *overrides):
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        return compose(
            "config",
            overrides=[f"output_dir={tmp_path}", "logger.wandb=false", "trainer.progress_bar=false", *overrides],
        )


@pytest.fixture(scope="module")
def history(tmp_path_factory):
    from framework.train import train

    res = train(cfg_for(tmp_path_factory.mktemp("perf"), *SMALL, "trainer.num_mini_batches=2"))
    return [r for r in res.history if "timing_s/step" in r]


def test_every_phase_is_timed_and_fits_in_the_step(history):
    assert len(history) == 2
    for row in history:
        parts = [row[f"timing_s/{p}"] for p in PHASES]
        assert all(v >= 0.0 for v in parts), row
        # two mini-batches: the rollout policy's log-probs are taken (and timed)
        assert row["timing_s/old_logp"] > 0.0 and row["timing_s/ref_logp"] > 0.0
        assert row["timing_s/rollout"] > 0.0 and row["timing_s/update"] > 0.0
        assert sum(parts) <= row["timing_s/step"] + 1e-6, row


def test_throughput_follows_from_tokens_and_times(history):
    for row in history:
        # 2 prompts x 2 samples: prompt tokens + completion tokens (mean length x 4)
        completion = row["completions/mean_length"] * 4
        assert row["perf/total_tokens"] > completion > 0
        assert row["perf/throughput"] == pytest.approx(row["perf/total_tokens"] / row["timing_s/step"], rel=1e-6)
        assert row["perf/update_tokens_per_s"] == pytest.approx(completion / row["timing_s/update"], rel=1e-6)
        assert row["perf/rollout_tokens_per_s"] == pytest.approx(completion / row["timing_s/rollout"], rel=1e-6)
        assert "perf/mfu" not in row  # a CPU: no peak FLOP/s to divide by


def test_mfu_counts_2n_per_forward_token_and_6n_per_trained_token():
    r = Rollout(
        completion_ids=torch.zeros(2, 3, dtype=torch.long),
        completion_mask=torch.tensor([[1.0, 1, 1], [1, 1, 0]]),
        group_ids=torch.zeros(2, dtype=torch.long),
        rewards=torch.zeros(2),
        correct=torch.zeros(2),
        truncated=torch.zeros(2, dtype=torch.bool),
        prompt_inputs={"attention_mask": torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])},
    )
    out = step_perf(r, {"step": 2.0, "update": 0.5}, ppo_epochs=2, no_grad_passes=1, n_params=10, peak=1000.0)
    tokens = 7 + 5  # prompt + completion
    assert out["perf/total_tokens"] == tokens
    assert out["perf/throughput"] == tokens / 2.0
    assert out["perf/update_tokens_per_s"] == 5 * 2 / 0.5
    # generation + 1 no-grad forward: 2N each; 2 epochs of forward + backward: 6N each
    assert out["perf/mfu"] == pytest.approx((2 * 10 * tokens * 2 + 6 * 10 * tokens * 2) / (2.0 * 1000.0))
    assert peak_flops("cpu") is None
