"""Clipped policy surrogate and loss aggregation. Pure functions on tensors.

Aggregation divides by GLOBAL denominators held in a :class:`framework.types.LossNormalizer`
(B, total tokens, L_max of the whole optimisation mini-batch, all ranks and accumulation
steps), so that summing the losses of the micro-batches gives exactly the loss of the
full mini-batch, whatever the micro-batch split.
"""

from __future__ import annotations

import torch

from framework.types import LossNormalizer

LOSS_AGGREGATIONS = ("seq_mean_token_mean", "token_mean", "seq_mean_token_sum_norm")


def clipped_surrogate(
    logp: torch.Tensor,
    logp_old: torch.Tensor,
    advantages: torch.Tensor,
    eps_low: float,
    eps_high: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO clipped surrogate per token:

        rho = exp(logp - logp_old)
        s   = min(rho * A, clip(rho, 1 - eps_low, 1 + eps_high) * A)

    logp, logp_old [N, T]; advantages [N] (broadcast over tokens).
    Returns (s [N, T], clipped_low [N, T] bool, clipped_high [N, T] bool) where
    clipped_low = (rho < 1 - eps_low) & (A < 0) and clipped_high = (rho > 1 + eps_high) & (A > 0)
    are the tokens on which the clip binds (the gradient of s is 0 there).
    With logp_old = logp.detach(): rho = 1, s = A, ds/dlogp = A.
    """
    adv = advantages.detach().to(logp.dtype).unsqueeze(-1)
    rho = torch.exp(logp - logp_old.detach())
    unclipped = rho * adv
    clipped = torch.clamp(rho, 1.0 - eps_low, 1.0 + eps_high) * adv
    s = torch.where(clipped < unclipped, clipped, unclipped)
    with torch.no_grad():
        low = (rho < 1.0 - eps_low) & (adv < 0)
        high = (rho > 1.0 + eps_high) & (adv > 0)
    return s, low, high


def truncated_is_weights(
    logp_trainer: torch.Tensor,
    logp_sampler: torch.Tensor,
    cap: float,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Truncated importance-sampling weights for tokens drawn by a sampler (e.g. vLLM) whose
    log-probs differ from the trainer's (Yao et al. 2025, "off-policy RL from inference
    mismatch"):

        w = min(exp(logp_trainer - logp_sampler), cap)      (detached)

    logp_trainer, logp_sampler [N, T] for the sampled tokens under the rollout policy (the
    trainer's forward and the engine's report). Masked positions (``mask`` == 0) get w = 0.
    ``Algorithm.loss`` multiplies the per-token surrogate by w.
    """
    w = torch.exp(logp_trainer.detach().double() - logp_sampler.detach().double()).clamp(max=float(cap))
    w = w.to(logp_trainer.dtype)
    if mask is not None:
        w = w * mask.to(w.dtype)
    return w


def _safe(denominator: float) -> float:
    d = float(denominator)
    return d if d > 0 else 1.0  # an empty batch: the numerator is 0 too


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, mode: str, norm: LossNormalizer) -> torch.Tensor:
    """Reduce a per-token quantity l [n, T] over the mask m [n, T] to a scalar:

        seq_mean_token_mean     : sum_i (1/|o_i|) sum_t m l / B        (GRPO)
        token_mean              : sum_{i,t} m l / num_tokens           (DAPO)
        seq_mean_token_sum_norm : sum_{i,t} m l / (B * L_max)          (Dr. GRPO)

    |o_i| = sum_t m_it is the sample's own length (local); B = norm.num_sequences,
    num_tokens = norm.num_tokens, L_max = norm.max_len are global to the mini-batch, so the
    sum over micro-batches equals the full-batch value. A fully masked sample contributes 0.
    Masked positions of ``per_token`` must be finite (0 * inf = nan).
    """
    m = mask.to(per_token.dtype)
    ml = per_token * m
    if mode == "seq_mean_token_mean":
        lengths = m.sum(-1)
        lengths = torch.where(lengths > 0, lengths, torch.ones_like(lengths))
        return (ml.sum(-1) / lengths).sum() / _safe(norm.num_sequences)
    if mode == "token_mean":
        return ml.sum() / _safe(norm.num_tokens)
    if mode == "seq_mean_token_sum_norm":
        return ml.sum() / _safe(norm.num_sequences * norm.max_len)
    raise ValueError(f"loss aggregation must be one of {LOSS_AGGREGATIONS}, got {mode!r}")


def token_sum_mean(per_token: torch.Tensor, mask: torch.Tensor, norm: LossNormalizer) -> torch.Tensor:
    """sum_{i,t} m x / num_tokens (global): the micro-batch share of a per-token mean metric."""
    return aggregate(per_token, mask, "token_mean", norm)


def make_normalizer(mask: torch.Tensor, max_len: float | None = None) -> LossNormalizer:
    """Normalizer of one process's mini-batch from its full mask [N, T] (single rank).
    With several ranks/accumulation steps, sum ``num_sequences`` and ``num_tokens`` over
    them (all-reduce) instead. ``max_len`` defaults to T (pass max_new_tokens for Dr. GRPO)."""
    return LossNormalizer(
        num_sequences=float(mask.shape[0]),
        num_tokens=float(mask.sum().item()),
        max_len=float(mask.shape[-1] if max_len is None else max_len),
    )
