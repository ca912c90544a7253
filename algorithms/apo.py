"""APO (View-R1): GRPO + STCR (on the advantages of long wrong answers) + DADS (on the KL
weight of positives, by group difficulty). Only two hooks differ from GRPO."""

from dataclasses import dataclass, field

import torch

from framework.registry import ALGORITHMS
from framework.types import Rollout

from .apo_components import DADS_VARIANTS, dads_weights, stcr_weights
from .base import KLConfig, check_choice, invalid_value
from .grpo import GRPO, AlgorithmConfig

STCR_LENGTH_UNITS = ("tokens", "chars")
# with stcr.length_unit=chars the rollout must carry the completion texts (list[str], N)


@dataclass
class DADSConfig:
    enabled: bool = True
    variant: str = "release"  # release: f = 1 - exp(-e p) | exp: f = exp(-e d)


@dataclass
class STCRConfig:
    enabled: bool = True
    lam: float = 1.00001
    only_negative_advantage: bool = True  # False reproduces the release exactly
    length_unit: str = "tokens"  # tokens (mask sum, incl. EOS) | chars


@dataclass
class APOConfig(AlgorithmConfig):
    name: str = "apo"
    kl: KLConfig = field(default_factory=lambda: KLConfig(coef=1e-3))
    dads: DADSConfig = field(default_factory=DADSConfig)
    stcr: STCRConfig = field(default_factory=STCRConfig)

    def validate(self) -> None:
        super().validate()
        check_choice("dads.variant", self.dads.variant, DADS_VARIANTS)
        check_choice("stcr.length_unit", self.stcr.length_unit, STCR_LENGTH_UNITS)
        if self.stcr.lam < 1.0:
            invalid_value("stcr.lam", self.stcr.lam, "a number >= 1")


@ALGORITHMS.register("apo")
class APO(GRPO):
    Config = APOConfig

    def completion_lengths(self, rollout: Rollout) -> torch.Tensor:
        """|o_i| [N] in ``stcr.length_unit``."""
        if self.cfg.stcr.length_unit == "tokens":
            return rollout.lengths
        texts = rollout.texts
        if len(texts) != rollout.rewards.shape[0]:
            raise ValueError("stcr.length_unit=chars needs rollout.texts (one decoded string per completion)")
        return torch.tensor([float(len(t)) for t in texts], dtype=torch.float64)

    def shape_advantages(self, rollout, advantages, metrics):
        """STCR: A_i <- w_i A_i (longer-than-correct wrong answers pushed down harder)."""
        if not self.cfg.stcr.enabled:
            return advantages
        w = stcr_weights(
            self.completion_lengths(rollout),
            rollout.correct,
            rollout.group_ids,
            advantages,
            lam=self.cfg.stcr.lam,
            only_negative_advantage=self.cfg.stcr.only_negative_advantage,
        )
        metrics["stcr/mean_weight"] = w.double().mean().item() if w.numel() else 1.0
        metrics["stcr/frac_penalised"] = (w > 1).double().mean().item() if w.numel() else 0.0
        return w * advantages

    def sample_kl_coef(self, rollout, advantages, beta, metrics):
        """DADS: beta_i = beta f(d) for A_i > 0, beta otherwise."""
        if not self.cfg.dads.enabled:
            return super().sample_kl_coef(rollout, advantages, beta, metrics)
        f = dads_weights(rollout.correct, rollout.group_ids, advantages, self.cfg.dads.variant)
        pos = advantages > 0
        metrics["dads/frac_positive"] = pos.double().mean().item() if pos.numel() else 0.0
        # mean multiplier over the samples it applies to (positives); 1 when none
        metrics["dads/mean_weight"] = f[pos].double().mean().item() if pos.any() else 1.0
        return beta * f
