"""``choice``: multiple-choice letter matching (shared with ``accuracy``).

Letters are matched as whole letters, never as substrings: ``"B"``, ``"(B)"``, ``"B."``,
``"B) 42"``, ``"The answer is B"``, ``"\\boxed{B}"`` give B; ``"BB"``, ``"AB"``,
``"Because"`` give nothing. Valid letters are A.. up to ``len(choices)`` (A..Z without
choices). The gold answer may be a letter or the text of one of the choices.
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence

from framework.errors import DataError
from framework.registry import REWARDS

from .base import Reward, extract_answer, gold_answer, record_name
from .verify import normalize_text

_LETTERS = string.ascii_uppercase
_WRAP_RE = re.compile(r"\\(?:boxed|text|textbf|textrm|mathrm|mathbf)\s*\{([^{}]*)\}")
# "B", "(B)", "[B]", "B.", "B)", "B:", "b"
_BARE_RE = re.compile(r"[\(\[]?\s*([A-Za-z])\s*[\)\]]?\s*[\.\:\)]?")
# "B) text", "B. text", "(B) text", "[B] text", "B: text"
_LEAD_RE = re.compile(r"(?:\(([A-Z])\)|\[([A-Z])\]|([A-Z])[\.\):])(?=\s|$)")
# "The answer is B", "Answer: (C)", "the correct option is D."
_KEYWORD_RE = re.compile(
    r"(?i:answer|option|choice)\s*(?i:is)?\s*[:=]?\s*(?i:option|choice)?\s*"
    r"[\(\[]?([A-Z])[\)\]]?(?![A-Za-z0-9])"
)
_OPTION_RE = re.compile(r"(?<![A-Za-z0-9])([A-Z])[\.\):](?=\s|$)")
_PAREN_RE = re.compile(r"[\(\[]([A-Z])[\)\]]")
_STANDALONE_RE = re.compile(r"(?<![A-Za-z0-9\\])([A-Z])(?![A-Za-z0-9])")


def _clean(text: str) -> str:
    t = text.strip()
    for _ in range(3):
        t2 = _WRAP_RE.sub(r"\1", t)
        if t2 == t:
            break
        t = t2
    return t.replace("$", "").replace("**", "").replace("`", "").strip()


def _valid_letters(num_choices: int | None) -> str:
    if not num_choices:
        return _LETTERS
    return _LETTERS[: max(1, min(int(num_choices), 26))]


def extract_choice_letter(text: str | None, num_choices: int | None = None) -> str | None:
    """The choice letter a (prediction) text names as a whole letter, or None."""
    if not text:
        return None
    valid = _valid_letters(num_choices)
    t = _clean(text)
    if not t:
        return None
    m = _BARE_RE.fullmatch(t)
    if m:
        letter = m.group(1).upper()
        return letter if letter in valid else None
    m = _LEAD_RE.match(t)
    if m:
        letter = next(g for g in m.groups() if g)
        others = {x for x in _PAREN_RE.findall(t) + _OPTION_RE.findall(t) if x in valid}
        if others - {letter}:  # "(A) or (B)", "A) 12 B) 15": ambiguous
            return None
        return letter if letter in valid else None
    hits = _KEYWORD_RE.findall(t)
    if hits:
        return hits[-1] if hits[-1] in valid else None
    paren = {x for x in _PAREN_RE.findall(t) if x in valid}
    if len(paren) == 1:
        return paren.pop()
    if paren:
        return None
    found = {}
    for m in _STANDALONE_RE.finditer(t):
        letter = m.group(1)
        if letter not in valid:
            continue
        # "A cat", "I think": a word, not a choice
        as_word = letter in "AI" and re.match(r"\s+[a-z]", t[m.end() :]) is not None
        found[letter] = (letter in found and found[letter]) or not as_word
    if len(found) == 1:
        letter, ok = next(iter(found.items()))
        return letter if ok else None
    return None


def gold_letter(answer: str, choices: Sequence[str] | None) -> str:
    """The gold letter from a letter (``"B"``, ``"(B)"``) or the text of one of the choices."""
    n = len(choices) if choices else None
    valid = _valid_letters(n)
    t = _clean(answer)
    m = _BARE_RE.fullmatch(t)
    if m and m.group(1).upper() in valid and (m.group(1).isupper() or len(t) == 1):
        return m.group(1).upper()
    if choices:
        norm = normalize_text(answer)
        for i, c in enumerate(choices):
            if normalize_text(str(c)) == norm:
                return _LETTERS[i]
    raise DataError(
        f"gold answer {answer!r} is neither a choice letter in {valid[0]}..{valid[-1]} "
        f"nor the text of one of the {n or 0} choices"
    )


def match_choice(pred: str | None, gold: str, choices: Sequence[str] | None) -> float:
    """1.0 if ``pred`` names the gold letter (or is the gold choice's text), else 0.0."""
    if not pred:
        return 0.0
    letter = extract_choice_letter(pred, len(choices) if choices else None)
    if letter is not None:
        return 1.0 if letter == gold else 0.0
    if choices:
        idx = _LETTERS.index(gold)
        if idx < len(choices) and normalize_text(pred) == normalize_text(str(choices[idx])):
            return 1.0
    return 0.0


@REWARDS.register("choice")
class ChoiceReward(Reward):
    """1.0 if the ``<answer>`` names the gold choice letter (whole-letter match)."""

    def __init__(self):
        pass

    def score(self, completion: str, record: dict) -> float:
        pred = extract_answer(completion)
        choices = record.get("choices") or None
        try:
            gold = gold_letter(gold_answer(record), choices)
        except ValueError as e:
            raise DataError(f"{e} ({record_name(record)})") from None
        if pred is None:
            return 0.0
        return match_choice(pred, gold, choices)
