"""Composable components any algorithm config can switch on (the hooks of :class:`algorithms.base.Algorithm`
call them; no algorithm names them):

* the per-sample KL weight  beta_i = schedule(step) * shaping_i, with the schedule
  ``algorithm.kl.schedule`` (algorithms.schedules) and the shaping ``algorithm.kl.sample_weight``
  (:data:`SAMPLE_KL_WEIGHTS`: ``none`` | ``dads`` | ``dads_exp``);
* STCR on the advantages (``algorithm.stcr.enabled``; apo_components.stcr_weights).

So "GSPO + GRPO-D schedule" is ``algorithm=gspo algorithm.kl.schedule.name=grpo_d``, "RLOO + DADS"
is ``algorithm=rloo algorithm.kl.sample_weight=dads``, "RLOO + STCR" ``algorithm.stcr.enabled=true``.
Add a shaping with :func:`register_sample_weight`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from framework.types import Rollout

from .apo_components import dads_weights, stcr_weights

# name -> f(rollout, advantages [N], metrics) -> multiplier [N] (dtype of advantages), or None
# for "no shaping" (beta_i = beta exactly)
SampleWeight = Callable[[Rollout, torch.Tensor, dict], "torch.Tensor | None"]


def _none(rollout: Rollout, advantages: torch.Tensor, metrics: dict) -> None:
    return None


def _dads(variant: str) -> SampleWeight:
    def weight(rollout: Rollout, advantages: torch.Tensor, metrics: dict) -> torch.Tensor:
        """DADS (View-R1): f(d) on the positives (A_i > 0, after STCR), 1 elsewhere."""
        f = dads_weights(rollout.correct, rollout.group_ids, advantages, variant)
        pos = advantages > 0
        metrics["dads/frac_positive"] = pos.double().mean().item() if pos.numel() else 0.0
        # mean multiplier over the samples it applies to (positives); 1 when none
        metrics["dads/mean_weight"] = f[pos].double().mean().item() if pos.any() else 1.0
        return f

    return weight


SAMPLE_KL_WEIGHTS: dict[str, SampleWeight] = {
    "none": _none,
    "dads": _dads("release"),  # f = 1 - exp(-e p) for 0 < p < 1 (the release's)
    "dads_exp": _dads("exp"),  # f = exp(-e d), the earlier variant
}


def register_sample_weight(name: str, fn: SampleWeight) -> None:
    SAMPLE_KL_WEIGHTS[name] = fn


def sample_kl_coef(name: str, rollout: Rollout, advantages: torch.Tensor, beta: float, metrics: dict) -> torch.Tensor:
    """beta_i = beta * f_i, f from ``SAMPLE_KL_WEIGHTS[name]`` ([N], dtype of advantages)."""
    f = SAMPLE_KL_WEIGHTS[name](rollout, advantages, metrics)
    if f is None:
        return torch.full_like(advantages, beta)
    return beta * f


def completion_lengths(rollout: Rollout, unit: str) -> torch.Tensor:
    """|o_i| [N] in ``unit``: tokens (mask sum, incl. EOS) or chars (needs ``rollout.texts``)."""
    if unit == "tokens":
        return rollout.lengths
    texts = rollout.texts
    if len(texts) != rollout.rewards.shape[0]:
        raise ValueError("stcr.length_unit=chars needs rollout.texts (one decoded string per completion)")
    return torch.tensor([float(len(t)) for t in texts], dtype=torch.float64)


def apply_stcr(
    stcr, rollout: Rollout, advantages: torch.Tensor, metrics: dict, lengths: torch.Tensor | None = None
) -> torch.Tensor:
    """STCR: A_i <- w_i A_i (wrong answers longer than the group's correct ones pushed down
    harder); ``stcr`` is an :class:`algorithms.base.STCRConfig`, ``lengths`` [N] the |o_i|
    (default: in ``stcr.length_unit``). Identity when not enabled."""
    if not stcr.enabled:
        return advantages
    w = stcr_weights(
        completion_lengths(rollout, stcr.length_unit) if lengths is None else lengths,
        rollout.correct,
        rollout.group_ids,
        advantages,
        lam=stcr.lam,
        only_negative_advantage=stcr.only_negative_advantage,
    )
    metrics["stcr/mean_weight"] = w.double().mean().item() if w.numel() else 1.0
    metrics["stcr/frac_penalised"] = (w > 1).double().mean().item() if w.numel() else 0.0
    return w * advantages
