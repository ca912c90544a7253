"""Reward plugin base class, the result type, score checks and answer extraction.

A reward plugin scores completions against dataset records::

    @REWARDS.register("my_reward")
    class MyReward(Reward):
        def __init__(self, scale: float = 1.0):
            self.scale = scale

        def score(self, completion: str, record: dict) -> float:
            ...

``Reward.__call__`` loops over :meth:`Reward.score` and turns any exception, and any return
value that is not a real number (:func:`as_score`: ``"7"`` is a failure, ``True`` is 1.0), into
a reward of 0.0 counted in :attr:`RewardResult.failures` (a reward never crashes a training
step). Plugins that score a batch at once (``accuracy`` uses a worker pool; a group-relative
reward compares the completions of a group) override ``__call__``: isolated, they get the whole
batch in one task by default.

:class:`rewards.RewardSet` (:mod:`rewards.rewardset`) combines the configured plugins.
"""

from __future__ import annotations

import inspect
import logging
import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from framework.errors import ConfigError, DataError, UserError
from framework.registry import REWARDS

log = logging.getLogger(__name__)

MAX_ERRORS = 5  # error messages kept per RewardResult
CORRECT_THRESHOLD = 1.0 - 1e-6


@dataclass
class RewardResult:
    """Scores of one plugin for one batch of completions."""

    scores: list[float] = field(default_factory=list)
    failures: int = 0  # completions whose scoring raised (scored 0.0)
    timeouts: int = 0  # completions whose scoring timed out (scored 0.0)
    errors: list[str] = field(default_factory=list)  # first MAX_ERRORS failure messages
    stats: dict[str, float] = field(default_factory=dict)  # extra counters to log

    def add_failure(self, err: BaseException | str) -> None:
        self.failures += 1
        if len(self.errors) < MAX_ERRORS:
            msg = err if isinstance(err, str) else f"{type(err).__name__}: {err}"
            self.errors.append(msg)

    def add_timeout(self, msg: str) -> None:
        self.timeouts += 1
        if len(self.errors) < MAX_ERRORS:
            self.errors.append(msg)


class RewardFailure(UserError):
    """A reward plugin that failed on more than ``reward.max_failure_frac`` of a batch (or
    cannot run at all); names the plugin and its first error. A user error: the CLIs print it
    as one line."""


def as_score(x: Any) -> float:
    """A plugin's return value as a finite float. Accepted: real numbers (``int``, ``float``,
    ``bool`` as 1.0/0.0, numpy reals, ``fractions.Fraction``) and 0-d arrays/tensors of them.
    Anything else, strings included (``"7"`` is not 7.0), is a TypeError; NaN/inf a ValueError."""
    if isinstance(x, (str, bytes, bytearray)):
        raise TypeError(f"reward returned a {type(x).__name__} ({x!r:.60}), not a number")
    if isinstance(x, numbers.Real):
        try:
            v = float(x)
        except (TypeError, ValueError, OverflowError) as e:
            raise TypeError(f"reward returned {type(x).__name__} that is not a float: {e}") from None
    elif getattr(x, "shape", None) == () and callable(getattr(x, "item", None)):
        return as_score(x.item())  # a 0-d numpy array or torch tensor
    else:
        raise TypeError(f"reward returned {type(x).__name__} ({x!r:.60}), not a number")
    if not math.isfinite(v):
        raise ValueError(f"non-finite reward {v}")
    return v


def check_result(res: Any, n: int) -> RewardResult:
    """``res`` (what a plugin's ``__call__`` returned for ``n`` completions) checked: a
    :class:`RewardResult` with ``n`` scores, each through :func:`as_score` (a bad one is 0.0
    and a failure), counts that are non-negative integers, stats that are finite numbers
    (others are dropped). A wrong type or length raises ValueError."""
    if not isinstance(res, RewardResult):
        raise ValueError(f"returned {type(res).__name__}, not a RewardResult")
    scores = list(res.scores) if isinstance(res.scores, (list, tuple)) else None
    if scores is None or len(scores) != n:
        got = len(scores) if scores is not None else type(res.scores).__name__
        raise ValueError(f"returned {got} scores for {n} completions")
    out = RewardResult(scores=[0.0] * n)
    for what in ("failures", "timeouts"):
        v = getattr(res, what, 0)
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 0:
            raise ValueError(f"RewardResult.{what} must be a non-negative integer, got {v!r}")
        setattr(out, what, min(int(v), n))
    out.errors = [str(m) for m in (res.errors or [])][:MAX_ERRORS]
    for i, s in enumerate(scores):
        try:
            out.scores[i] = as_score(s)
        except (TypeError, ValueError) as e:
            out.add_failure(e)
    for k, v in (res.stats or {}).items() if isinstance(res.stats, Mapping) else ():
        try:
            out.stats[str(k)] = as_score(v)
        except (TypeError, ValueError):
            pass
    return out


def extract_answer(completion: str) -> str | None:
    """Content of the last ``<answer>...</answer>`` block, stripped; None if there is none."""
    if not isinstance(completion, str):
        return None
    end = completion.rfind("</answer>")
    if end < 0:
        return None
    start = completion.rfind("<answer>", 0, end)
    if start < 0:
        return None
    return completion[start + len("<answer>") : end].strip()


def record_name(record: Mapping[str, Any]) -> str:
    """A short human-readable name for a record, for error messages."""
    if isinstance(record, Mapping):
        meta = record.get("metadata")
        for key in ("id", "uid", "index", "idx"):
            if record.get(key) is not None:
                return f"record {key}={record[key]!r}"
            if isinstance(meta, Mapping) and meta.get(key) is not None:
                return f"record metadata.{key}={meta[key]!r}"
        q = record.get("question")
        if isinstance(q, str) and q:
            q = " ".join(q.split())
            return f"record with question {q[:80]!r}"
    return f"record {str(record)[:80]}"


def gold_answer(record: Mapping[str, Any]) -> str:
    """``record["answer"]`` as a stripped string; an absent/empty gold answer is a data error."""
    gold = record.get("answer") if isinstance(record, Mapping) else None
    if gold is not None and not isinstance(gold, str):
        gold = str(gold)
    if gold is None or not gold.strip():
        raise DataError(f"empty gold answer in {record_name(record)}")
    return gold.strip()


class Reward:
    """Base class of reward plugins. Constructor keyword params come from the config."""

    name: str = ""  # the registered name; RewardSet sets it on instances
    isolated: bool = False  # True for rewards.isolated.IsolatedReward (runs in worker processes)

    def score(self, completion: str, record: dict) -> float:
        raise NotImplementedError

    def __call__(self, completions: Sequence[str], records: Sequence[dict]) -> RewardResult:
        _check_lengths(completions, records)
        res = RewardResult()
        for completion, record in zip(completions, records):
            try:
                s = as_score(self.score(completion, record))
            except Exception as e:  # noqa: BLE001 - a reward must never crash the step
                res.add_failure(e)
                s = 0.0
            res.scores.append(s)
        return res

    def close(self) -> None:
        """Release resources (worker pools). Safe to call more than once."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def _check_lengths(completions: Sequence[Any], records: Sequence[Any]) -> None:
    if len(completions) != len(records):
        raise ValueError(
            f"got {len(completions)} completions but {len(records)} records; pass one record per completion"
        )


def accepted_params(cls: type) -> list[str] | None:
    """Keyword params of ``cls.__init__``; None if it takes ``**kwargs``."""
    sig = inspect.signature(cls.__init__)
    names = []
    for i, p in enumerate(sig.parameters.values()):
        if i == 0 and p.name == "self":
            continue
        if p.kind is inspect.Parameter.VAR_KEYWORD:
            return None
        if p.kind is inspect.Parameter.VAR_POSITIONAL:
            continue
        names.append(p.name)
    return names


def check_params(name: str, cls: type, params: Mapping[str, Any], reserved: list[str]) -> None:
    """The parameter names of reward ``name`` against its class's constructor (``reserved``:
    the component keys the reward set itself takes, listed among the accepted ones)."""
    accepted = accepted_params(cls)
    if accepted is not None:
        unknown = sorted(set(params) - set(accepted))
        if unknown:
            raise ConfigError(
                f"reward '{name}' ({cls.__module__}.{cls.__qualname__}) got unknown parameter(s) "
                f"{unknown}; accepted parameters: {reserved + accepted}"
            )


def build_reward(name: str, params: Mapping[str, Any] | None = None) -> Reward:
    """Instantiate the registered reward ``name`` with ``params`` (``weight`` excluded)."""
    cls = REWARDS.get(name)  # UnknownNameError lists the registered names
    params = dict(params or {})
    check_params(name, cls, params, reserved=["weight"])
    try:
        obj = cls(**params)
    except (TypeError, ValueError) as e:
        accepted = accepted_params(cls)
        raise ConfigError(
            f"reward '{name}': invalid parameters {params}: {e}. Accepted parameters: "
            f"{['weight'] + (accepted if accepted is not None else ['**kwargs'])}"
        ) from e
    try:
        obj.name = name
    except AttributeError:
        pass
    return obj
