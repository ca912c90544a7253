"""Reward plugins (registered in ``framework.registry.REWARDS``) and :class:`RewardSet`.

Built-in rewards: ``format``, ``accuracy``, ``choice``, ``numeric``, ``length``.
"""

from . import accuracy, choice, format, length, numeric  # noqa: F401,E401  (registration)
from .accuracy import AccuracyReward  # noqa: F401
from .base import (  # noqa: F401
    Reward,
    RewardResult,
    RewardSet,
    build_reward,
    extract_answer,
)
from .choice import ChoiceReward, extract_choice_letter, gold_letter, match_choice  # noqa: F401
from .format import FormatReward, format_ok  # noqa: F401
from .length import LengthReward  # noqa: F401
from .numeric import NumericReward, parse_number  # noqa: F401
from .verify import VerifyPool, normalize_text, verify_answer  # noqa: F401

__all__ = [
    "Reward",
    "RewardResult",
    "RewardSet",
    "build_reward",
    "extract_answer",
    "AccuracyReward",
    "ChoiceReward",
    "FormatReward",
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
]
