"""Clipped policy surrogate and loss aggregation. Pure functions on tensors.

Aggregation divides by GLOBAL denominators held in a :class:`framework.types.LossNormalizer`
(B, total tokens, L_max of the whole optimisation mini-batch, all ranks and accumulation
steps), so that summing the losses of the micro-batches gives exactly the loss of the
full mini-batch, whatever the micro-batch split.
"""

from __future__ import annotations

import torch

from framework.types import LossNormalizer

LOSS_AGGREGATIONS = ("seq_mean_token_mean", "token_mean", "seq_mean_token_sum_norm", "seq_mean_token_sum")


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
    return clipped_objective(rho, adv, eps_low, eps_high)


def clipped_objective(
    ratio: torch.Tensor, adv: torch.Tensor, eps_low: float, eps_high: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """min(ratio * A, clip(ratio, 1 - eps_low, 1 + eps_high) * A) and where the clip binds:
    (s, (ratio < 1 - eps_low) & (A < 0), (ratio > 1 + eps_high) & (A > 0)), shapes of ratio * A.
    The PPO and GSPO surrogates differ only in their ratio (per token / per sequence)."""
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high) * adv
    s = torch.where(clipped < unclipped, clipped, unclipped)
    with torch.no_grad():
        low = (ratio < 1.0 - eps_low) & (adv < 0)
        high = (ratio > 1.0 + eps_high) & (adv > 0)
    return s, low, high


def sequence_log_ratio(logp: torch.Tensor, logp_old: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Length-normalised log of the sequence importance ratio (GSPO):

        log s_i = (1/|o_i|) sum_t m_it (logp_it - logp_old_it)

    logp, logp_old, mask [N, T] -> [N] (gradient through ``logp``; a sequence with no counted
    token gets 0, i.e. s_i = 1). Needs whole rows: micro-batches split rows, never tokens."""
    m = mask.to(logp.dtype)
    lengths = m.sum(-1)
    lengths = torch.where(lengths > 0, lengths, torch.ones_like(lengths))
    return ((logp - logp_old.detach()) * m).sum(-1) / lengths


def gspo_surrogate(
    logp: torch.Tensor,
    logp_old: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    eps_low: float,
    eps_high: float,
    token_level: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GSPO's clipped sequence-level surrogate (arXiv 2507.18071), broadcast to the tokens:

        s_i      = exp((1/|o_i|) sum_t (logp_it - logp_old_it))         (sequence ratio)
        J_i      = min(s_i A_i, clip(s_i, 1 - eps_low, 1 + eps_high) A_i)
        out_it   = J_i for every t                      (token_level=False: GSPO)

    With ``seq_mean_token_mean`` aggregation the loss is -(1/B) sum_i J_i, GSPO's objective;
    d out_it / d logp_is = s_i A_i / |o_i| (unclipped), 0 for every token of a clipped sequence.
    token_level=True is GSPO-token: s_it = sg(s_i) * exp(logp_it - sg(logp_it)) (value s_i)
    clipped per token; with one advantage per sequence (all this trainer has) its value and
    gradient equal GSPO's, as the paper notes.

    logp, logp_old, mask [N, T]; advantages [N]. Returns (out [N, T], clipped_low [N, T],
    clipped_high [N, T]), the flags broadcast from the sequence (the tokens of clipped sequences).
    """
    adv = advantages.detach().to(logp.dtype)
    log_s = sequence_log_ratio(logp, logp_old, mask)
    if token_level:
        ratio = torch.exp(log_s.detach().unsqueeze(-1) + logp - logp.detach())  # [N, T], value s_i
        a = adv.unsqueeze(-1)
    else:
        ratio = torch.exp(log_s)  # [N]
        a = adv
    s, low, high = clipped_objective(ratio, a, eps_low, eps_high)
    if not token_level:
        T = logp.shape[-1]
        s = s.unsqueeze(-1).expand(-1, T)
        low, high = low.unsqueeze(-1).expand(-1, T), high.unsqueeze(-1).expand(-1, T)
    return s, low, high


def cispo_surrogate(
    logp: torch.Tensor,
    logp_old: torch.Tensor,
    advantages: torch.Tensor,
    eps_low: float,
    eps_high: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CISPO's per-token objective (MiniMax-M1, arXiv 2506.13585, section 3.1):

        r_it = exp(logp_it - logp_old_it),   w_it = clip(r_it, 1 - eps_low, 1 + eps_high)
        out_it = sg(w_it) * A_i * logp_it

    so d out_it / d logp_it = w_it A_i for every token: a token whose ratio exceeds the cap is
    not dropped (as the PPO clip drops it) but weighted by the capped value. eps_low = 1 puts
    no lower bound on the weight (the paper's choice). Returns (out [N, T], capped_low,
    capped_high) with capped_* the tokens whose weight was capped (they still get a gradient).
    """
    adv = advantages.detach().to(logp.dtype).unsqueeze(-1)
    with torch.no_grad():
        ratio = torch.exp(logp - logp_old)
        w = torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high)
        low = ratio < 1.0 - eps_low
        high = ratio > 1.0 + eps_high
    return w * adv * logp, low, high


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
        seq_mean_token_sum      : sum_{i,t} m l / B                    (RLOO: the completion is one
                                                                        action, log pi(o|q) = sum_t)

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
    if mode == "seq_mean_token_sum":
        return ml.sum() / _safe(norm.num_sequences)
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
