"""APO components (View-R1, arXiv 2506.21655): STCR and DADS as pure functions on tensors.

Shapes: N completions; group_ids [N] long; correct [N] in {0, 1} (accuracy reward only);
advantages [N] (after STCR for DADS). Both return per-sample multiplicative weights [N].
"""

from __future__ import annotations

import math

import torch

from .advantages import group_index, group_mean, group_sum

DADS_VARIANTS = ("release", "exp")


def pass_rate(correct: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """p_g = mean_{i in g} c_i, broadcast to samples: [N] -> [N]. Difficulty d = 1 - p."""
    return group_mean(correct.to(torch.float64), group_ids)


def stcr_weights(
    lengths: torch.Tensor,
    correct: torch.Tensor,
    group_ids: torch.Tensor,
    advantages: torch.Tensor,
    lam: float = 1.00001,
    only_negative_advantage: bool = True,
) -> torch.Tensor:
    """Suboptimal Trajectory Complexity Regularization weights (applied as A_i <- w_i A_i):

        L+_g = sum_{i in g} c_i |o_i| / sum_{i in g} c_i        (mean length of correct ones)
        D_i  = |o_i| - L+_g                                      (for incorrect, c_i = 0)
        w_i  = 1 + [c_i = 0] [D_i > 0] [sum_g c > 0] (1 - lam^(-D_i))      in [1, 2)

    With only_negative_advantage (default) w_i = 1 where A_i >= 0; False reproduces the
    release, which also amplifies an incorrect sample with A_i > 0.
    lengths [N] (e.g. tokens), correct [N], group_ids [N], advantages [N] -> w [N]
    (dtype of advantages; computed in float64).
    """
    c = correct.detach().to(torch.float64)
    length = lengths.detach().to(torch.float64)
    inv, _ = group_index(group_ids)
    n_correct = group_sum(c, group_ids)[inv]
    len_correct = group_sum(c * length, group_ids)[inv]
    l_plus = len_correct / torch.where(n_correct > 0, n_correct, torch.ones_like(n_correct))
    excess = length - l_plus
    active = (c == 0) & (excess > 0) & (n_correct > 0)
    if only_negative_advantage:
        active &= advantages.detach() < 0
    # lam^(-D) = exp(-D ln lam)
    penalty = -torch.expm1(-excess.clamp_min(0) * math.log(lam))
    w = torch.where(active, 1.0 + penalty, torch.ones_like(penalty))
    return w.to(advantages.dtype)


def dads_factor(p: torch.Tensor, variant: str = "release") -> torch.Tensor:
    """f(d), d = 1 - p:  1 if p in {0, 1};  release: 1 - exp(-e (1 - d)) = 1 - exp(-e p);
    exp (earlier variant, commented out in the release): exp(-e d).   p [N] -> f [N]."""
    if variant == "release":
        f = -torch.expm1(-math.e * p)
    elif variant == "exp":
        f = torch.exp(-math.e * (1.0 - p))
    else:
        raise ValueError(f"dads variant must be one of {DADS_VARIANTS}, got {variant!r}")
    return torch.where((p == 0) | (p == 1), torch.ones_like(f), f)


def dads_weights(
    correct: torch.Tensor,
    group_ids: torch.Tensor,
    advantages: torch.Tensor,
    variant: str = "release",
) -> torch.Tensor:
    """Difficulty-Adaptive Divergence Shaping: per-sample KL weight multiplier

        beta_i = beta * f(d_g)   if A_i > 0
        beta_i = beta            otherwise

    correct [N], group_ids [N], advantages [N] -> f_i [N] (dtype of advantages).
    Positives of hard prompts (low pass rate p) get a looser KL leash.
    """
    p = pass_rate(correct, group_ids)
    f = dads_factor(p, variant)
    w = torch.where(advantages.detach() > 0, f, torch.ones_like(f))
    return w.to(advantages.dtype)
