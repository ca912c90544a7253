"""Example plugin: GRPO with a length penalty in the reward, registered as "grpo_len".

Use it without editing apo-rl: put this folder on PYTHONPATH and run with
``plugins=[my_algo] algorithm.name=grpo_len`` (or algorithm=grpo plus the override).
"""

from dataclasses import dataclass

import torch

from algorithms.base import check_nonneg
from algorithms.grpo import GRPO, AlgorithmConfig
from framework.registry import ALGORITHMS


@dataclass
class GRPOLenConfig(AlgorithmConfig):
    name: str = "grpo_len"
    length_penalty: float = 1e-3  # reward -= length_penalty * |o_i| (tokens)

    def validate(self) -> None:
        super().validate()
        check_nonneg("length_penalty", self.length_penalty)


@ALGORITHMS.register("grpo_len")
class GRPOLen(GRPO):
    """GRPO whose rewards are shaped by r_i <- r_i - length_penalty * |o_i|."""

    Config = GRPOLenConfig

    def shape_rewards(self, rollout) -> torch.Tensor:
        return rollout.rewards - self.cfg.length_penalty * rollout.lengths
