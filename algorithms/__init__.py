"""RL objectives for apo-rl. Importing this package registers "grpo", "grpo_d", "apo",
"gspo", "rloo", "reinforce_pp" and "cispo" in ``framework.registry.ALGORITHMS``; build one
with :func:`build_algorithm`.

Layout: pure tensor math in ``advantages``, ``kl``, ``schedules``, ``losses``,
``apo_components``; components any algorithm switches on from its config (per-sample KL
weight, STCR) in ``components``; the trainer-facing interface in ``base``; classes in
``grpo``, ``apo``, ``gspo``, ``rloo``, ``reinforce_pp``, ``cispo``.
"""

from .advantages import global_normalize, group_advantages, rloo_advantages, zero_std_groups
from .apo import APO, APOConfig
from .apo_components import dads_weights, stcr_weights
from .base import Algorithm, AlgorithmConfig, build_algorithm
from .cispo import CISPO, CISPOConfig
from .components import SAMPLE_KL_WEIGHTS, register_sample_weight
from .grpo import GRPO, GRPOD, GRPODConfig
from .gspo import GSPO, GSPOConfig
from .kl import kl_estimator
from .losses import aggregate, clipped_surrogate, make_normalizer
from .reinforce_pp import ReinforcePP, ReinforcePPConfig
from .rloo import RLOO, RLOOConfig
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
    "GSPO",
    "GSPOConfig",
    "RLOO",
    "RLOOConfig",
    "ReinforcePP",
    "ReinforcePPConfig",
    "CISPO",
    "CISPOConfig",
    "SAMPLE_KL_WEIGHTS",
    "register_sample_weight",
    "rloo_advantages",
    "global_normalize",
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
