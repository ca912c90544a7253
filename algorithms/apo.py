"""APO (View-R1): GRPO + STCR (on the advantages of long wrong answers) + DADS (on the KL
weight of positives, by group difficulty).

Both are components any algorithm can take (algorithms/components.py: ``stcr.enabled``,
``kl.sample_weight=dads``); APO is GRPO with both switched on by default, keeping its own
``dads.enabled`` / ``dads.variant`` switches."""

from dataclasses import dataclass, field

from framework.registry import ALGORITHMS

from .apo_components import DADS_VARIANTS
from .base import STCR_LENGTH_UNITS, KLConfig, STCRConfig, check_choice, invalid_value
from .grpo import GRPO, AlgorithmConfig

__all__ = ["APO", "APOConfig", "DADSConfig", "STCRConfig", "STCR_LENGTH_UNITS"]

# dads.variant -> the name of the same shaping in components.SAMPLE_KL_WEIGHTS
DADS_SAMPLE_WEIGHTS = {"release": "dads", "exp": "dads_exp"}


@dataclass
class DADSConfig:
    enabled: bool = True
    variant: str = "release"  # release: f = 1 - exp(-e p) | exp: f = exp(-e d)


@dataclass
class APOConfig(AlgorithmConfig):
    name: str = "apo"
    kl: KLConfig = field(default_factory=lambda: KLConfig(coef=1e-3))
    dads: DADSConfig = field(default_factory=DADSConfig)
    stcr: STCRConfig = field(default_factory=lambda: STCRConfig(enabled=True))

    def validate(self) -> None:
        super().validate()
        check_choice("dads.variant", self.dads.variant, DADS_VARIANTS)
        if self.dads.enabled and self.kl.sample_weight not in ("none", DADS_SAMPLE_WEIGHTS[self.dads.variant]):
            invalid_value(
                "kl.sample_weight",
                self.kl.sample_weight,
                f"none or {DADS_SAMPLE_WEIGHTS[self.dads.variant]} while algorithm.dads.enabled=true "
                "(DADS is the APO's shaping; set algorithm.dads.enabled=false to use another)",
            )


@ALGORITHMS.register("apo")
class APO(GRPO):
    """STCR via ``stcr`` (on by default), DADS via ``dads`` (on by default): beta_i = beta f(d)
    for A_i > 0, beta otherwise. With ``dads.enabled=false`` the shaping is ``kl.sample_weight``."""

    Config = APOConfig

    @property
    def sample_weight(self) -> str:
        if self.cfg.dads.enabled:
            return DADS_SAMPLE_WEIGHTS[self.cfg.dads.variant]
        return self.cfg.kl.sample_weight
