"""``accuracy``: the ``<answer>`` verified against ``record["answer"]`` (R1-V / View-R1).

* Multiple choice (the record has ``choices`` and the gold is a choice letter, or the text of
  one choice): whole-letter matching (see :mod:`rewards.choice`); a prediction that names no
  letter is verified against the gold choice's text as below.
* Otherwise math-verify (symbolic: ``0.5 == \\frac{1}{2}``, ``$3$ == 3``, ``x=3`` vs ``3`` per
  math-verify), falling back to normalised string match (lowercase, collapsed whitespace,
  no trailing period, surrounding ``$`` and ``\\text{}`` removed) when the prediction does
  not parse ("Red." matches "red").
* A gold answer that math-verify cannot parse is matched by normalised string equality only
  (never a free 1) and counted per completion in ``stats["gold_parse_failures"]`` (text
  answers such as "red" count there too). An empty gold answer is a data error: a failure.
* No ``<answer>`` tag: 0.0 (counted in ``stats["missing_answer"]``, not a failure).

Verification runs in a pool of ``workers`` processes with a per-completion ``timeout_s``
(0.0 and counted in ``timeouts``); ``workers=0`` verifies in-process without any timeout.
"""

from __future__ import annotations

from collections.abc import Sequence

from framework.errors import ConfigError, DataError
from framework.registry import REWARDS

from .base import Reward, RewardResult, _check_lengths, extract_answer, gold_answer, record_name
from .choice import _LETTERS, extract_choice_letter, gold_letter
from .verify import VerifyPool, verify_answer


@REWARDS.register("accuracy")
class AccuracyReward(Reward):
    def __init__(self, timeout_s: float = 5.0, workers: int = 4):
        timeout_s, workers = float(timeout_s), int(workers)
        if timeout_s <= 0:
            raise ConfigError(f"timeout_s must be > 0, got {timeout_s}")
        if workers < 0:
            raise ConfigError(f"workers must be >= 0 (0 = in-process), got {workers}")
        self.timeout_s = timeout_s
        self.workers = workers
        self._pool: VerifyPool | None = None

    @property
    def pool(self) -> VerifyPool:
        """The verification pool, created (not yet started) on first use."""
        if self._pool is None:
            self._pool = VerifyPool(workers=self.workers, timeout_s=self.timeout_s)
        return self._pool

    def _prepare(self, completion: str, record: dict) -> tuple[float | None, dict | None]:
        """(score, None) when decided here; (None, {"pred", "gold"}) when it needs math-verify."""
        gold = gold_answer(record)
        pred = extract_answer(completion)
        if pred is None:
            return 0.0, None
        choices = record.get("choices") or None
        if choices:
            try:
                letter = gold_letter(gold, choices)
            except ValueError:
                letter = None
            if letter is not None:
                pred_letter = extract_choice_letter(pred, len(choices))
                if pred_letter is not None:
                    return (1.0 if pred_letter == letter else 0.0), None
                gold = str(choices[_LETTERS.index(letter)]).strip()
                if not gold:
                    raise DataError(f"empty text for the gold choice {letter} in {record_name(record)}")
        if not pred:
            return 0.0, None
        return None, {"pred": pred, "gold": gold}

    def score(self, completion: str, record: dict) -> float:
        """One completion, in-process (no timeout)."""
        s, item = self._prepare(completion, record)
        if item is None:
            return s
        return verify_answer(item["pred"], item["gold"], None)["score"]

    def __call__(self, completions: Sequence[str], records: Sequence[dict]) -> RewardResult:
        _check_lengths(completions, records)
        n = len(completions)
        res = RewardResult(scores=[0.0] * n)
        items: list[dict] = []
        where: list[int] = []
        missing = 0
        for i, (c, r) in enumerate(zip(completions, records)):
            try:
                s, item = self._prepare(c, r)
            except Exception as e:  # noqa: BLE001
                res.add_failure(f"{type(e).__name__}: {e}")
                continue
            if item is None:
                res.scores[i] = float(s)
                if isinstance(c, str) and extract_answer(c) is None:
                    missing += 1
            else:
                items.append(item)
                where.append(i)

        if self.workers == 0:
            outs = []
            for it in items:
                try:
                    outs.append({"status": "ok", **verify_answer(it["pred"], it["gold"], None)})
                except Exception as e:  # noqa: BLE001
                    outs.append({"status": "error", "error": f"{type(e).__name__}: {e}"})
        else:
            outs = self.pool.run(items) if items else []

        gold_fail = 0
        for i, out in zip(where, outs):
            status = out["status"]
            if status == "ok":
                res.scores[i] = float(out["score"])
                gold_fail += not out["gold_ok"]
            elif status == "timeout":
                res.add_timeout(f"math-verify timed out after {self.timeout_s:g}s ({record_name(records[i])})")
            else:
                res.add_failure(f"{out['error']} ({record_name(records[i])})")
        res.stats = {"gold_parse_failures": float(gold_fail), "missing_answer": float(missing)}
        return res

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001
            pass

    def __repr__(self) -> str:
        return f"AccuracyReward(timeout_s={self.timeout_s}, workers={self.workers})"
