"""Reward plugins (registered in ``framework.registry.REWARDS``) and :class:`RewardSet`.

Built-in rewards: ``format``, ``accuracy``, ``choice``, ``numeric``, ``length`` (run in the
trainer process); any other plugin runs in worker processes under a time limit per call
(:mod:`rewards.isolated`, on the pool of :mod:`rewards.workers`).
"""

from . import accuracy, choice, format, length, numeric  # noqa: F401,E401  (registration)
from .accuracy import AccuracyReward  # noqa: F401
from .base import (  # noqa: F401
    Reward,
    RewardFailure,
    RewardResult,
    RewardScores,
    RewardSet,
    as_score,
    build_reward,
    extract_answer,
)
from .choice import ChoiceReward, extract_choice_letter, gold_letter, match_choice  # noqa: F401
from .format import FormatReward, format_ok  # noqa: F401
from .isolated import IsolatedReward  # noqa: F401
from .length import LengthReward  # noqa: F401
from .numeric import NumericReward, parse_number  # noqa: F401
from .verify import VerifyPool, normalize_text, verify_answer  # noqa: F401
from .workers import WorkerPool  # noqa: F401

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
