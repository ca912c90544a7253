"""``length``: a penalty for completions longer than ``target``.

Length is measured on the whole completion (surrounding whitespace stripped) in
``unit="chars"`` (characters, default: tokenizer-free and deterministic) or
``unit="words"`` (whitespace-separated words; roughly 0.75 tokens each for English).
``mode="penalty"`` (the only mode): ``-min(1, max(0, length - target) / target)``, i.e. 0.0
up to the target, falling linearly to -1.0 at twice the target and clipped there.
"""

from __future__ import annotations

from framework.errors import ConfigError
from framework.registry import REWARDS

from .base import Reward

UNITS = ("chars", "words")
MODES = ("penalty",)


@REWARDS.register("length")
class LengthReward(Reward):
    def __init__(self, target: int = 1024, unit: str = "chars", mode: str = "penalty"):
        if unit not in UNITS:
            raise ConfigError(f"unit must be one of {UNITS}, got {unit!r}")
        if mode not in MODES:
            raise ConfigError(f"mode must be one of {MODES}, got {mode!r}")
        if not target or float(target) <= 0:
            raise ConfigError(f"target must be > 0, got {target!r}")
        self.target, self.unit, self.mode = float(target), unit, mode

    def measure(self, completion: str) -> int:
        text = completion.strip()
        return len(text) if self.unit == "chars" else len(text.split())

    def score(self, completion: str, record: dict) -> float:
        over = max(0.0, self.measure(completion) - self.target) / self.target
        return -min(1.0, over)
