"""RLOO: REINFORCE Leave-One-Out (Ahmadian et al., "Back to Basics", arXiv 2402.14740,
section 3 / eq. for RLOO, after Kool et al. 2019).

Each of the k completions of a prompt is baselined by the mean reward of the other k - 1:

    A_i  = r_i - (1/(k-1)) sum_{j != i} r_j            (no std scaling)
    grad = (1/k) sum_i A_i grad log pi(o_i|q),   log pi(o_i|q) = sum_t log pi(o_it|q, o_i<t)

The whole completion is one action, so the loss is the token SUM per sequence averaged over
sequences (``loss_agg=seq_mean_token_sum``). The policy term is the clipped surrogate (rho = 1
on-policy, where it is exactly REINFORCE; the clip only acts on off-policy mini-batches, as in
TRL's RLOO trainer).

KL: the paper subtracts beta * log(pi(o|q) / pi_ref(o|q)) from the reward. This trainer
computes the reference log-probs after the advantages (``Algorithm.prepare`` runs first), so
the KL is a loss term here: beta * sum_t k2_t per sequence (k2's gradient is the on-policy
gradient of the per-token KL), with the paper's beta = 0.03 (appendix C, training details).
``advantage.scale`` still applies after the leave-one-out baseline (none by default; group /
batch divide by the std, as TRL's ``normalize_advantages``).
"""

from dataclasses import dataclass, field

import torch

from framework.registry import ALGORITHMS
from framework.types import Rollout

from .advantages import group_index, group_sum, rloo_advantages, zero_std_groups
from .base import AdvantageConfig, KLConfig
from .grpo import GRPO, AlgorithmConfig


@dataclass
class RLOOConfig(AlgorithmConfig):
    """RLOO's defaults (configs/algorithm/rloo.yaml states the same, with sources)."""

    name: str = "rloo"
    advantage: AdvantageConfig = field(default_factory=lambda: AdvantageConfig(scale="none"))
    loss_agg: str = "seq_mean_token_sum"
    kl: KLConfig = field(default_factory=lambda: KLConfig(estimator="k2", coef=0.03))


@ALGORITHMS.register("rloo")
class RLOO(GRPO):
    Config = RLOOConfig

    def compute_advantages(self, rollout: Rollout) -> torch.Tensor:
        adv = rloo_advantages(rollout.rewards, rollout.group_ids)
        scale, eps = self.cfg.advantage.scale, self.cfg.advantage.eps
        if scale == "none":
            return adv
        r = rollout.rewards.detach()
        inv, _ = group_index(rollout.group_ids)
        if scale == "group":
            n = group_sum(torch.ones_like(r), rollout.group_ids)
            centred = r - (group_sum(r, rollout.group_ids) / n)[inv]
            std = (group_sum(centred * centred, rollout.group_ids) / (n - 1).clamp_min(1)).sqrt()[inv]
        else:
            std = r.std(unbiased=True) if r.numel() > 1 else r.new_zeros(())
        adv = adv / (std + eps)
        zero = zero_std_groups(r, rollout.group_ids)[inv]
        return torch.where(zero, torch.zeros_like(adv), adv)
