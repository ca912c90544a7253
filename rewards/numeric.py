"""``numeric``: the ``<answer>`` as a number, compared to the gold with tolerances.

Accepted forms: ``1,234.5`` (comma thousands separators), ``-3``, ``.5``, ``1e-3``,
``2.5E+4``, ``$12`` / ``\\$12``, ``45%`` / ``45\\%`` (the percent sign is dropped: ``45%``
is 45), fractions ``3/4`` and ``\\frac{3}{4}``, surrounding ``$...$``. A text holding exactly
one number ("x = 5", "5 cm") gives that number; otherwise (none, or several) it does not
parse. Score 1.0 iff ``math.isclose(pred, gold, rel_tol, abs_tol)``; an unparsable
prediction scores 0.0; an unparsable gold answer is a data error (a failure).
"""

from __future__ import annotations

import math
import re

from framework.errors import ConfigError, DataError
from framework.registry import REWARDS

from .base import Reward, extract_answer, gold_answer, record_name

_NUM = r"[-+]?(?:\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?"
_NUMBER_RE = re.compile(rf"(?P<a>{_NUM})(?:\s*/\s*(?P<b>{_NUM}))?")
_FRAC_RE = re.compile(r"\\[dt]?frac\s*\{\s*([^{}]+?)\s*\}\s*\{\s*([^{}]+?)\s*\}")


def _to_float(a: str, b: str | None) -> float | None:
    try:
        x = float(a.replace(",", ""))
        if b is not None:
            d = float(b.replace(",", ""))
            if d == 0:
                return None
            x /= d
    except ValueError:
        return None
    return x if math.isfinite(x) else None


def parse_number(text: str | None) -> float | None:
    """The number a short answer states, or None."""
    if text is None:
        return None
    t = str(text).strip()
    while len(t) >= 2 and t.startswith("$") and t.endswith("$"):
        t = t[1:-1].strip()
    t = _FRAC_RE.sub(r"\1/\2", t)
    t = t.replace("\\%", "%").replace("\\$", "$").replace("\\,", "").replace("\\!", "")
    t = re.sub(r"\\(?:text|mathrm)\s*\{([^{}]*)\}", r"\1", t).strip().rstrip(".").strip()
    m = re.fullmatch(rf"(?P<neg>-)?\s*\$?\s*({_NUMBER_RE.pattern})\s*%?", t)
    if m:
        x = _to_float(m.group("a"), m.group("b"))
        if x is not None and m.group("neg"):
            x = -x
        return x
    hits = list(_NUMBER_RE.finditer(t))
    if len(hits) == 1:
        return _to_float(hits[0].group("a"), hits[0].group("b"))
    return None


@REWARDS.register("numeric")
class NumericReward(Reward):
    def __init__(self, rel_tol: float = 1e-4, abs_tol: float = 1e-6):
        self.rel_tol, self.abs_tol = float(rel_tol), float(abs_tol)
        if self.rel_tol < 0 or self.abs_tol < 0:
            raise ConfigError("rel_tol and abs_tol must be >= 0")

    def score(self, completion: str, record: dict) -> float:
        gold_s = gold_answer(record)
        gold = parse_number(gold_s)
        if gold is None:
            raise DataError(f"gold answer {gold_s!r} is not a number ({record_name(record)})")
        pred = parse_number(extract_answer(completion))
        if pred is None:
            return 0.0
        return 1.0 if math.isclose(pred, gold, rel_tol=self.rel_tol, abs_tol=self.abs_tol) else 0.0
