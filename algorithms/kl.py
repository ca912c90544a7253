"""Per-token KL estimators (Schulman's k1/k2/k3). Pure functions on tensors."""

from __future__ import annotations

import torch

KL_ESTIMATORS = ("k1", "k2", "k3")


def kl_estimator(logp: torch.Tensor, logp_ref: torch.Tensor, kind: str = "k3") -> torch.Tensor:
    """Estimate of KL(pi || pi_ref) per sampled token, with x = logp_ref - logp:

        k1 = -x            (unbiased, can be negative)
        k2 = x^2 / 2       (biased, >= 0)
        k3 = exp(x) - x - 1 (unbiased, >= 0; GRPO default)

    logp, logp_ref [N, T] -> [N, T]. Gradient flows through ``logp`` only (ref is detached).
    """
    x = logp_ref.detach() - logp
    if kind == "k1":
        return -x
    if kind == "k2":
        return 0.5 * x * x
    if kind == "k3":
        return torch.exp(x) - x - 1.0
    raise ValueError(f"kl estimator must be one of {KL_ESTIMATORS}, got {kind!r}")
