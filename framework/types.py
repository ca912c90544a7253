"""Data that flows between rollout, rewards, algorithms and the update.

Shapes: N = number of completions in the batch (num_prompts * G), T = padded completion
length. The G completions of one prompt are contiguous and share a ``group_ids`` value.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch


@dataclass
class Rollout:
    completion_ids: torch.Tensor  # [N, T] long, right padded with pad id
    completion_mask: torch.Tensor  # [N, T] float, 1 on tokens that count (incl. EOS)
    group_ids: torch.Tensor  # [N] long, sample i belongs to group group_ids[i]
    rewards: torch.Tensor  # [N] float, weighted sum of reward plugins
    correct: torch.Tensor  # [N] float in {0,1}, from the correctness reward only
    truncated: torch.Tensor  # [N] bool, hit max_new_tokens without EOS
    reward_components: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> [N]
    logp_old: torch.Tensor | None = None  # [N, T] log-probs under the rollout policy
    logp_ref: torch.Tensor | None = None  # [N, T] log-probs under the frozen reference
    logp_sampler: torch.Tensor | None = None  # [N, T] log-probs reported by the engine
    advantages: torch.Tensor | None = None  # [N] set by Algorithm.prepare
    kl_coef: torch.Tensor | None = None  # [N] per-sample KL weight beta_i, set by prepare
    tis_weights: torch.Tensor | None = None  # [N, T] truncated IS weights sampler -> trainer (rollout.tis_cap)
    extras: dict[str, Any] = field(default_factory=dict)  # prompt inputs etc. (not sliced)

    @property
    def lengths(self) -> torch.Tensor:
        """|o_i|: counted completion tokens per sample, [N] float."""
        return self.completion_mask.sum(-1)

    def select(self, idx: torch.Tensor) -> Rollout:
        """Rows ``idx`` of every per-sample tensor (extras are kept as they are)."""
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, torch.Tensor):
                out[f.name] = v[idx]
            elif f.name == "reward_components":
                out[f.name] = {k: t[idx] for k, t in v.items()}
            else:
                out[f.name] = v
        return replace(self, **out)


@dataclass
class LossNormalizer:
    """Global denominators of one optimisation (mini-)batch, so that summing the losses of
    its micro-batches (and ranks) gives exactly the loss of the whole batch.

    num_sequences: B, completions in the mini-batch (all ranks, all accumulation steps)
    num_tokens: sum of completion_mask over the mini-batch (all ranks, all accumulation steps)
    max_len: L_max for seq_mean_token_sum_norm (Dr. GRPO) = the generation budget max_new_tokens
    """

    num_sequences: float
    num_tokens: float
    max_len: float
