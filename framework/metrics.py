"""The numbers one RL step reports (TRL/verl names) and their reduction over ranks.

``step_metrics`` assembles them from the rollout, the algorithm's ``prepare``, the update and
the timings; ``reduce_over_ranks`` makes every rank report the global value. Logging them is
the Lightning module's job (framework/module.py).
"""

from __future__ import annotations

import math

import torch

from framework.distributed import all_reduce
from framework.types import Rollout

# metrics that add up over ranks (each rank holds its share of a global sum); the rest are means
ADDITIVE = ("loss", "policy_loss", "kl_loss", "kl", "clip_ratio", "clip_ratio/low", "clip_ratio/high", "entropy")


def pass_rates(r: Rollout, group_size: int) -> torch.Tensor:
    """Fraction of correct completions of each group, [num_groups]."""
    return r.correct.view(-1, group_size).mean(1)


def rollout_metrics(r: Rollout, group_size: int) -> dict[str, float]:
    """Reward, accuracy, lengths (all / correct / incorrect), truncation and pass rates."""
    L = r.lengths
    c = r.correct.bool()
    pr = pass_rates(r, group_size)
    return {
        "reward": float(r.rewards.mean()),
        "reward_std": float(r.rewards.std()) if len(r.rewards) > 1 else 0.0,
        "accuracy": float(r.correct.mean()),
        "completions/mean_length": float(L.mean()),
        "completions/mean_length_correct": float(L[c].mean()) if c.any() else float("nan"),
        "completions/mean_length_incorrect": float(L[~c].mean()) if (~c).any() else float("nan"),
        "completions/clipped_ratio": float(r.truncated.float().mean()),
        "pass_rate/mean": float(pr.mean()),
        "pass_rate/all_correct": float((pr == 1).float().mean()),
        "pass_rate/all_wrong": float((pr == 0).float().mean()),
    }


def reduce_over_ranks(metrics: dict[str, float], world_size: int) -> dict[str, float]:
    """Global values: sums for :data:`ADDITIVE` metrics, means for the rest; ``grad_norm`` is
    computed after the gradient all-reduce, so it is already global. Identity on one process."""
    if world_size <= 1:
        return metrics
    keys = sorted(k for k, v in metrics.items() if v is not None and not (isinstance(v, float) and math.isnan(v)))
    vals = all_reduce([float(metrics[k]) for k in keys], "sum")
    out = {k: v if k in ADDITIVE else v / world_size for k, v in zip(keys, vals)}
    if "grad_norm" in metrics:
        out["grad_norm"] = metrics["grad_norm"]
    return out


def sampler_gap(logp_sampler: torch.Tensor, logp_trainer: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """|logp_sampler - logp_trainer| per counted token: mean and max (stale engine weights or a
    prompt-processing mismatch show here)."""
    diff = (logp_sampler - logp_trainer).abs() * mask
    return {
        "rollout/logp_diff_mean": float(diff.sum() / mask.sum().clamp(min=1)),
        "rollout/logp_diff_max": float(diff.max()),
    }


def tis_metrics(weights: torch.Tensor, cap: float, mask: torch.Tensor) -> dict[str, float]:
    """Mean truncated-IS weight and the fraction of tokens at the cap."""
    n = mask.sum().clamp(min=1)
    return {
        "rollout/tis_weight_mean": float((weights * mask).sum() / n),
        "rollout/tis_capped_frac": float(((weights >= cap) * mask).sum() / n),
    }
