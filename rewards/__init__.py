"""Reward plugins (registered in ``framework.registry.REWARDS``) and :class:`RewardSet`.

Built-in rewards: ``format``, ``accuracy``, ``choice``, ``numeric``, ``length`` (run in the
trainer process); any other plugin runs in worker processes under a time limit per call
(:mod:`rewards.isolated`, on pebble's process pool: :mod:`rewards.pool`). The ``reward``
config section is :class:`rewards.config.RewardConfig`.
"""

from . import accuracy, choice, format, length, numeric  # noqa: F401,E401  (registration)
from .accuracy import AccuracyReward  # noqa: F401
from .base import Reward, RewardFailure, RewardResult, as_score, build_reward, extract_answer  # noqa: F401
from .choice import ChoiceReward, extract_choice_letter, gold_letter, match_choice  # noqa: F401
from .config import IsolationConfig, RewardConfig  # noqa: F401
from .format import FormatReward, format_ok  # noqa: F401
from .isolated import IsolatedReward  # noqa: F401
from .length import LengthReward  # noqa: F401
from .numeric import NumericReward, parse_number  # noqa: F401
from .pool import WorkerPool  # noqa: F401
from .rewardset import RewardScores, RewardSet, is_builtin  # noqa: F401
from .verify import VerifyPool, normalize_text, verify_answer  # noqa: F401

__all__ = [
    "Reward",
    "RewardFailure",
    "RewardResult",
    "RewardScores",
    "RewardSet",
    "as_score",
    "build_reward",
    "extract_answer",
    "AccuracyReward",
    "ChoiceReward",
    "FormatReward",
    "IsolatedReward",
    "IsolationConfig",
    "RewardConfig",
    "is_builtin",
    "LengthReward",
    "NumericReward",
    "extract_choice_letter",
    "gold_letter",
    "match_choice",
    "format_ok",
    "parse_number",
    "VerifyPool",
    "normalize_text",
    "verify_answer",
    "WorkerPool",
]
