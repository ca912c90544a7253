"""Group-relative advantages (GRPO, Dr. GRPO). Pure functions on tensors.

Shapes: N completions, K groups. ``group_ids`` [N] long may hold any values; groups are
ordered by ``torch.unique`` (sorted ids), which is the order of per-group outputs here.
"""

from __future__ import annotations

import torch

ADVANTAGE_SCALES = ("group", "batch", "none")


def group_index(group_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Map arbitrary group ids [N] to dense indices 0..K-1 (sorted order). Returns (inv [N], K)."""
    _, inv = torch.unique(group_ids, sorted=True, return_inverse=True)
    return inv, int(inv.max().item()) + 1 if inv.numel() else 0


def group_sum(x: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """sum_{i in g} x_i for every group: [N] -> [K]."""
    inv, k = group_index(group_ids)
    return torch.zeros(k, dtype=x.dtype, device=x.device).index_add_(0, inv, x)


def group_mean(x: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """mean_{i in g} x_i broadcast back to samples: [N] -> [N]."""
    inv, _ = group_index(group_ids)
    counts = group_sum(torch.ones_like(x), group_ids)
    return (group_sum(x, group_ids) / counts)[inv]


def zero_std_groups(rewards: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """Groups whose rewards are all equal (exact comparison): [N] -> bool [K].

    Use ``zero_std_groups(r, g)[group_index(g)[0]]`` for the per-sample mask.
    """
    inv, k = group_index(group_ids)
    lo = torch.full((k,), float("inf"), dtype=rewards.dtype, device=rewards.device)
    hi = torch.full((k,), float("-inf"), dtype=rewards.dtype, device=rewards.device)
    lo = lo.scatter_reduce(0, inv, rewards, reduce="amin")
    hi = hi.scatter_reduce(0, inv, rewards, reduce="amax")
    return lo == hi


def group_advantages(
    rewards: torch.Tensor, group_ids: torch.Tensor, scale: str = "group", eps: float = 1e-4
) -> torch.Tensor:
    """Group-relative advantage, one value per completion.

        A_i = (r_i - mean_g(r)) / (std_g(r) + eps)   scale="group" (GRPO; std unbiased, /(G-1))
        A_i = (r_i - mean_g(r)) / (std(r) + eps)     scale="batch" (std over the whole batch,
                                                       unbiased)
        A_i =  r_i - mean_g(r)                       scale="none"  (Dr. GRPO)

    A group whose rewards are all equal gets A = 0 exactly (also a group of one sample).

    rewards [N] float, group_ids [N] long -> advantages [N] (dtype of rewards).
    """
    if scale not in ADVANTAGE_SCALES:
        raise ValueError(f"advantage scale must be one of {ADVANTAGE_SCALES}, got {scale!r}")
    rewards = rewards.detach()
    inv, _ = group_index(group_ids)
    centred = rewards - group_mean(rewards, group_ids)
    if scale == "group":
        n = group_sum(torch.ones_like(rewards), group_ids)
        var = group_sum(centred * centred, group_ids) / (n - 1).clamp_min(1)
        adv = centred / (var.sqrt()[inv] + eps)
    elif scale == "batch":
        std = rewards.std(unbiased=True) if rewards.numel() > 1 else rewards.new_zeros(())
        adv = centred / (std + eps)
    else:
        adv = centred
    zero = zero_std_groups(rewards, group_ids)[inv]
    return torch.where(zero, torch.zeros_like(adv), adv)


def rloo_advantages(rewards: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """REINFORCE Leave-One-Out baseline (Ahmadian et al., arXiv 2402.14740):

        A_i = r_i - (1/(G-1)) sum_{j in g, j != i} r_j  =  G/(G-1) * (r_i - mean_g(r))

    No std scaling. A group whose rewards are all equal gets A = 0 exactly, and so does a
    group of one sample (no other sample to compare with).
    rewards [N], group_ids [N] -> [N] (dtype of rewards).
    """
    rewards = rewards.detach()
    inv, _ = group_index(group_ids)
    n = group_sum(torch.ones_like(rewards), group_ids)[inv]
    total = group_sum(rewards, group_ids)[inv]
    loo_mean = (total - rewards) / (n - 1).clamp_min(1)
    adv = torch.where(n > 1, rewards - loo_mean, torch.zeros_like(rewards))
    zero = zero_std_groups(rewards, group_ids)[inv]
    return torch.where(zero, torch.zeros_like(adv), adv)


GLOBAL_NORM_WEIGHTS = ("tokens", "samples")


def global_normalize(
    values: torch.Tensor, lengths: torch.Tensor, weight: str = "tokens", eps: float = 1e-4
) -> torch.Tensor:
    """Global (whole-batch) advantage normalisation of REINFORCE++ (arXiv 2501.03262):

        A_i = (x_i - mu) / (sigma + eps)

    with mu, sigma the mean and (population) standard deviation over the batch. weight="tokens":
    over every counted token, x_i broadcast to the |o_i| tokens of its completion (the paper's
    per-token advantages; OpenRLHF's implementation), i.e. weights |o_i|; "samples": one value
    per completion. A batch whose values are all equal gets A = 0.
    values [N], lengths [N] (|o_i|) -> [N] (dtype of values).
    """
    if weight not in GLOBAL_NORM_WEIGHTS:
        raise ValueError(f"global normalisation weight must be one of {GLOBAL_NORM_WEIGHTS}, got {weight!r}")
    x = values.detach()
    if x.numel() == 0 or bool((x == x[0]).all()):
        return torch.zeros_like(x)
    w = lengths.detach().to(x.dtype) if weight == "tokens" else torch.ones_like(x)
    total = w.sum()
    if total <= 0:
        return torch.zeros_like(x)
    mu = (w * x).sum() / total
    var = (w * (x - mu) ** 2).sum() / total
    return (x - mu) / (var.sqrt() + eps)
