"""The numbers one RL step reports (TRL/verl names) and their reduction over ranks.

``step_metrics`` assembles them from the rollout, the algorithm's ``prepare``, the update and
the timings; ``reduce_over_ranks`` makes every rank report the global value. Logging them is
the Lightning module's job (framework/module.py).
"""

from __future__ import annotations

import math

import torch

from framework.distributed import all_reduce
from framework.types import Rollout, TrainBatch

# metrics that add up over ranks (each rank holds its share of a global sum); the rest are means
ADDITIVE = (
    "loss",
    "policy_loss",
    "kl_loss",
    "kl",
    "clip_ratio",
    "clip_ratio/low",
    "clip_ratio/high",
    "entropy",
    "perf/total_tokens",
)


def pass_rates(r: Rollout, group_size: int) -> torch.Tensor:
    """Fraction of correct completions of each group, [num_groups]."""
    return r.correct.view(-1, group_size).mean(1)


def rollout_metrics(
    r: Rollout, group_size: int, *, rewards: torch.Tensor | None = None, mask: torch.Tensor | None = None
) -> dict[str, float]:
    """Reward, accuracy, lengths (all / correct / incorrect), truncation and pass rates.
    ``rewards`` [N] (default ``r.rewards``): the trainer passes the shaped ones
    (``Prepared.rewards``); ``mask`` [N, T] (default ``r.completion_mask``) counts the lengths:
    the trainer passes the loss mask (``Prepared.loss_mask``)."""
    rewards = r.rewards if rewards is None else rewards
    L = r.lengths if mask is None else mask.sum(-1)
    c = r.correct.bool()
    pr = pass_rates(r, group_size)
    return {
        "reward": float(rewards.mean()),
        "reward_std": float(rewards.std()) if len(rewards) > 1 else 0.0,
        "accuracy": float(r.correct.mean()),
        "completions/mean_length": float(L.mean()),
        "completions/mean_length_correct": float(L[c].mean()) if c.any() else float("nan"),
        "completions/mean_length_incorrect": float(L[~c].mean()) if (~c).any() else float("nan"),
        "completions/clipped_ratio": float(r.truncated.float().mean()),
        "pass_rate/mean": float(pr.mean()),
        "pass_rate/all_correct": float((pr == 1).float().mean()),
        "pass_rate/all_wrong": float((pr == 0).float().mean()),
    }


# dense bf16 peak FLOP/s of the GPUs perf/mfu knows (datasheets); other devices log no MFU
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}

# the phases of one RL step, each logged as timing_s/<phase> (0.0 when it did not run)
PHASES = ("rollout", "reward", "ref_logp", "old_logp", "update", "sync")


def peak_flops(device) -> float | None:
    """Dense bf16 peak FLOP/s of ``device`` when it is a GPU in :data:`PEAK_TFLOPS`, else None."""
    if torch.device(device).type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v * 1e12 for k, v in PEAK_TFLOPS.items() if k in name), None)


def step_perf(
    r: Rollout | TrainBatch,
    timings: dict[str, float],
    *,
    ppo_epochs: int,
    no_grad_passes: int,
    n_params: int,
    peak: float | None,
) -> dict[str, float]:
    """Throughput of one RL step on this rank (the verl / EasyR1 definitions).

    * ``perf/throughput`` = all tokens of the step (prompt + completion of every sample, by the
      attention mask) / step time; the mean over ranks is tokens / (step time x devices).
    * ``perf/update_tokens_per_s`` = completion tokens x ppo_epochs / update time.
    * ``perf/mfu`` (GPUs of known peak only) = model FLOPs / (step time x peak), with the
      usual 2 N FLOPs per token of a forward and 6 N of a forward + backward (N: ``n_params``,
      the language model's parameters; attention and the vision tower are not counted): the
      generation's forward over every token, ``no_grad_passes`` reference / old-policy
      forwards and ``ppo_epochs`` training passes.
    """
    completion = float(r.completion_mask.sum())
    prompt = float(r.prompt_inputs["attention_mask"].sum()) if "attention_mask" in r.prompt_inputs else 0.0
    tokens = prompt + completion
    step_s = max(timings["step"], 1e-9)
    out = {
        "perf/throughput": tokens / step_s,
        "perf/update_tokens_per_s": completion * ppo_epochs / max(timings["update"], 1e-9),
        "perf/total_tokens": tokens,
    }
    if peak:
        flops = 2 * n_params * tokens * (1 + no_grad_passes) + 6 * n_params * tokens * ppo_epochs
        out["perf/mfu"] = flops / (step_s * peak)
    return out


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
