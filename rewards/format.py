"""``format``: 1.0 iff the completion is ``<think>...</think>`` then ``<answer>...</answer>``.

After stripping surrounding whitespace the whole completion must match (R1-V shape)
``^<think>.*?</think>\\s*<answer>.*?</answer>$`` (DOTALL), with exactly one of each of the
four tags anywhere, and non-whitespace content in both blocks. Anything else scores 0.0:
text before ``<think>``, between ``</think>`` and ``<answer>`` or after ``</answer>``,
a second (or nested, or unclosed) tag, an empty block.
"""

from __future__ import annotations

import re

from framework.registry import REWARDS

from .base import Reward

FORMAT_RE = re.compile(r"<think>(.*?)</think>\s*<answer>(.*?)</answer>", re.DOTALL)
_TAGS = ("<think>", "</think>", "<answer>", "</answer>")


def format_ok(completion: str) -> bool:
    if not isinstance(completion, str):
        return False
    text = completion.strip()
    if any(text.count(t) != 1 for t in _TAGS):
        return False
    m = FORMAT_RE.fullmatch(text)
    return bool(m) and bool(m.group(1).strip()) and bool(m.group(2).strip())


@REWARDS.register("format")
class FormatReward(Reward):
    def __init__(self):
        pass

    def score(self, completion: str, record: dict) -> float:
        return 1.0 if format_ok(completion) else 0.0
