"""GRPO (DeepSeekMath) and GRPO-D (OThink-MR1: GRPO with the dynamic KL schedule).

Dr. GRPO and DAPO are GRPO configurations (see configs/algorithm/dr_grpo.yaml, dapo.yaml).
"""

from dataclasses import dataclass, field

import torch

from framework.registry import ALGORITHMS
from framework.types import Rollout

from .advantages import group_advantages
from .base import Algorithm, AlgorithmConfig, KLConfig, KLScheduleConfig


@ALGORITHMS.register("grpo")
class GRPO(Algorithm):
    """A_i = group-relative advantage (``advantage.scale``), clipped surrogate, KL in loss."""

    Config = AlgorithmConfig

    def compute_advantages(self, rollout: Rollout) -> torch.Tensor:
        return group_advantages(
            rollout.rewards, rollout.group_ids, scale=self.cfg.advantage.scale, eps=self.cfg.advantage.eps
        )


def _grpo_d_kl() -> KLConfig:
    return KLConfig(schedule=KLScheduleConfig(name="grpo_d", beta_min=0.0, beta_max=0.02, explore_frac=0.3))


@dataclass
class GRPODConfig(AlgorithmConfig):
    """GRPO-D defaults: grpo_d schedule with the paper's geometry constants (0.0 / 0.02)."""

    name: str = "grpo_d"
    kl: KLConfig = field(default_factory=_grpo_d_kl)


@ALGORITHMS.register("grpo_d")
class GRPOD(GRPO):
    """GRPO whose KL weight follows the GRPO-D schedule (falls then rises). The reference
    model stays loaded even where beta = 0 (needs_reference uses the schedule's peak)."""

    Config = GRPODConfig
