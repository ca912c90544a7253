"""REINFORCE++ (Hu et al., arXiv 2501.03262): a critic-free PPO whose advantages are
normalised over the whole batch instead of per prompt (v9 of the paper, its method section,
"global advantage normalization").

    REINFORCE++            (baseline=none):        A~_i = r_i
    REINFORCE++ w/ baseline (baseline=group_mean):  A~_i = r_i - mean_g(r)
    A_i = (A~_i - mean_batch(A~)) / (std_batch(A~) + eps)

mean/std over the batch's tokens (each completion counted |o_i| times; the paper normalises
per-token advantages, as OpenRLHF does; ``normalize_by=samples``: once per completion); std
is the population one. Unlike GRPO a zero-variance group keeps a (global) advantage in the
plain variant. The policy term is PPO's clipped surrogate (eps 0.2), token-mean aggregated
(OpenRLHF's default).

KL: the paper puts a per-token k1 penalty in the reward (summed over the remaining tokens,
then normalised with the advantages). This trainer computes the reference log-probs after the
advantages (``Algorithm.prepare`` runs first), so the KL is a loss term, with the k2 estimator
(its gradient is the on-policy per-token KL gradient): what the authors' OpenRLHF recipe for the
baseline variant does (``--use_kl_loss --kl_estimator k2``).

The "batch" is what ``prepare`` sees: the rollout of this rank (as ``advantage.scale=batch``);
with several ranks the statistics are per rank.
"""

from dataclasses import dataclass, field

import torch

from framework.registry import ALGORITHMS
from framework.types import Rollout

from .advantages import GLOBAL_NORM_WEIGHTS, global_normalize, group_index, group_mean, zero_std_groups
from .base import KLConfig, check_choice
from .grpo import GRPO, AlgorithmConfig

REINFORCE_PP_BASELINES = ("none", "group_mean")


@dataclass
class ReinforcePPConfig(AlgorithmConfig):
    """REINFORCE++'s defaults (configs/algorithm/reinforce_pp.yaml states the same, with
    sources). ``advantage.scale`` is not used (the normalisation is global); ``advantage.eps``
    is the eps of the global std."""

    name: str = "reinforce_pp"
    baseline: str = "none"  # none (REINFORCE++) | group_mean (REINFORCE++ w/ baseline)
    normalize_by: str = "tokens"  # tokens | samples: the weights of the global mean/std
    loss_agg: str = "token_mean"
    kl: KLConfig = field(default_factory=lambda: KLConfig(estimator="k2", coef=1e-4))

    def validate(self) -> None:
        super().validate()
        check_choice("baseline", self.baseline, REINFORCE_PP_BASELINES)
        check_choice("normalize_by", self.normalize_by, GLOBAL_NORM_WEIGHTS)


@ALGORITHMS.register("reinforce_pp")
class ReinforcePP(GRPO):
    Config = ReinforcePPConfig

    def compute_advantages(self, rollout: Rollout) -> torch.Tensor:
        r = rollout.rewards.detach()
        x = r
        if self.cfg.baseline == "group_mean":  # a zero-variance group is exactly 0 before normalising
            zero = zero_std_groups(r, rollout.group_ids)[group_index(rollout.group_ids)[0]]
            x = torch.where(zero, torch.zeros_like(r), r - group_mean(r, rollout.group_ids))
        return global_normalize(x, rollout.lengths, self.cfg.normalize_by, self.cfg.advantage.eps)
