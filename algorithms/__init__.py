"""RL objectives for apo-rl. Importing this package registers "grpo", "grpo_d" and "apo"
in ``framework.registry.ALGORITHMS``; build one with :func:`build_algorithm`.

Layout: pure tensor math in ``advantages``, ``kl``, ``schedules``, ``losses``,
``apo_components``; the trainer-facing interface in ``base``; classes in ``grpo``, ``apo``.
"""

from .advantages import group_advantages, zero_std_groups
from .apo import APO, APOConfig
from .apo_components import dads_weights, stcr_weights
from .base import Algorithm, AlgorithmConfig, build_algorithm
from .grpo import GRPO, GRPOD, GRPODConfig
from .kl import kl_estimator
from .losses import aggregate, clipped_surrogate, make_normalizer
from .schedules import SCHEDULES, make_schedule

__all__ = [
    "Algorithm",
    "AlgorithmConfig",
    "build_algorithm",
    "GRPO",
    "GRPOD",
    "GRPODConfig",
    "APO",
    "APOConfig",
    "group_advantages",
    "zero_std_groups",
    "kl_estimator",
    "make_schedule",
    "SCHEDULES",
    "aggregate",
    "clipped_surrogate",
    "make_normalizer",
    "stcr_weights",
    "dads_weights",
]
