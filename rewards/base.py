"""Reward plugin base class, the result type, answer extraction and :class:`RewardSet`.

A reward plugin scores completions against dataset records::

    @REWARDS.register("my_reward")
    class MyReward(Reward):
        def __init__(self, scale: float = 1.0):
            self.scale = scale

        def score(self, completion: str, record: dict) -> float:
            ...

``Reward.__call__`` loops over :meth:`Reward.score` and turns any exception into a reward of
0.0 counted in :attr:`RewardResult.failures` (a reward never crashes a training step).
Plugins that batch (``accuracy`` uses a worker pool) override ``__call__``.

:class:`RewardSet` combines the configured plugins into the total reward, the per-plugin
components, the correctness ``c_i`` (from one plugin alone, ``accuracy`` by default) and
metrics to log.
"""

from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from framework.errors import ConfigError, DataError
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

    def score(self, completion: str, record: dict) -> float:
        raise NotImplementedError

    def __call__(self, completions: Sequence[str], records: Sequence[dict]) -> RewardResult:
        _check_lengths(completions, records)
        res = RewardResult()
        for completion, record in zip(completions, records):
            try:
                s = float(self.score(completion, record))
                if not math.isfinite(s):
                    raise ValueError(f"non-finite reward {s}")
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


def build_reward(name: str, params: Mapping[str, Any] | None = None) -> Reward:
    """Instantiate the registered reward ``name`` with ``params`` (``weight`` excluded)."""
    cls = REWARDS.get(name)  # UnknownNameError lists the registered names
    params = dict(params or {})
    accepted = accepted_params(cls)
    if accepted is not None:
        unknown = sorted(set(params) - set(accepted))
        if unknown:
            raise ConfigError(
                f"reward '{name}' ({cls.__module__}.{cls.__qualname__}) got unknown "
                f"parameter(s) {unknown}; accepted parameters: "
                f"{['weight'] + accepted}"
            )
    try:
        obj = cls(**params)
    except (TypeError, ValueError) as e:
        raise ConfigError(
            f"reward '{name}': invalid parameters {params}: {e}. Accepted parameters: "
            f"{['weight'] + (accepted if accepted is not None else ['**kwargs'])}"
        ) from e
    try:
        obj.name = name
    except AttributeError:
        pass
    return obj


@dataclass
class RewardScores:
    """What a :class:`RewardSet` gives for a batch, one entry per completion in each list:
    ``total`` the weighted sum, ``components`` each plugin's raw score, ``correct`` 1/0 from the
    correctness plugin alone, ``metrics`` per-plugin means, failures and timeouts."""

    total: list[float]
    components: dict[str, list[float]]
    correct: list[float]
    metrics: dict[str, float]


class RewardSet:
    """The configured reward plugins, their weights and the correctness plugin.

    ``components`` maps a registered reward name to ``{weight: float, **params}``. The total
    reward is ``sum(weight * score)``. Correctness ``c_i`` is 1.0 where the score of the
    ``correctness`` plugin is >= 1 - 1e-6, else 0.0; that plugin is computed even with
    weight 0 (and added with weight 0 when it is not among the components).
    """

    def __init__(self, components: Mapping[str, Mapping[str, Any] | None], correctness: str = "accuracy"):
        if not isinstance(components, Mapping) or not components:
            raise ConfigError("RewardSet needs a non-empty mapping {reward_name: {weight, ...}}")
        self.rewards: dict[str, Reward] = {}
        self.weights: dict[str, float] = {}
        self.correctness = str(correctness)
        try:
            for name, params in components.items():
                name = str(name)
                params = dict(params) if params is not None else {}
                weight = params.pop("weight", 1.0)
                try:
                    weight = float(weight)
                except (TypeError, ValueError):
                    raise ConfigError(f"reward '{name}': weight must be a number, got {weight!r}") from None
                if not math.isfinite(weight):
                    raise ConfigError(f"reward '{name}': weight must be finite, got {weight}")
                self.rewards[name] = build_reward(name, params)
                self.weights[name] = weight
            if self.correctness not in self.rewards:
                self.rewards[self.correctness] = build_reward(self.correctness)
                self.weights[self.correctness] = 0.0
        except BaseException:
            self.close()
            raise

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> RewardSet:
        """From ``{correctness: str, components: {name: {weight, **params}}}``."""
        if not isinstance(cfg, Mapping):
            raise ConfigError(f"reward config must be a mapping, got {type(cfg).__name__}")
        unknown = sorted(set(cfg) - {"correctness", "components"})
        if unknown:
            raise ConfigError(f"unknown key(s) {unknown} in the reward config; expected 'correctness' and 'components'")
        if "components" not in cfg:
            raise ConfigError("the reward config needs 'components: {name: {weight: ...}}'")
        return cls(cfg["components"], correctness=cfg.get("correctness", "accuracy"))

    def __call__(self, completions: Sequence[str], records: Sequence[dict]) -> RewardScores:
        """Score every completion with every plugin (see :class:`RewardScores`)."""
        _check_lengths(completions, records)
        n = len(completions)
        total = [0.0] * n
        components: dict[str, list[float]] = {}
        metrics: dict[str, float] = {}
        for name, reward in self.rewards.items():
            try:
                res = reward(list(completions), list(records))
                if not isinstance(res, RewardResult) or len(res.scores) != n:
                    raise ValueError(
                        f"reward '{name}' returned {type(res).__name__} with "
                        f"{len(getattr(res, 'scores', []) or [])} scores for {n} completions"
                    )
                scores = []
                for s in res.scores:
                    s = float(s)
                    if not math.isfinite(s):
                        res.add_failure(f"non-finite reward {s}")
                        s = 0.0
                    scores.append(s)
            except Exception as e:  # noqa: BLE001 - the step goes on with zeros
                res = RewardResult(scores=[0.0] * n, failures=n, errors=[f"{type(e).__name__}: {e}"])
                scores = res.scores
            if res.failures or res.timeouts:
                log.warning(
                    "reward '%s': %d failures, %d timeouts of %d; first errors: %s",
                    name,
                    res.failures,
                    res.timeouts,
                    n,
                    res.errors[:3],
                )
            components[name] = scores
            w = self.weights[name]
            if w:
                for i, s in enumerate(scores):
                    total[i] += w * s
            metrics[f"rewards/{name}/mean"] = sum(scores) / n if n else 0.0
            metrics[f"rewards/{name}/failures"] = float(res.failures)
            metrics[f"rewards/{name}/timeouts"] = float(res.timeouts)
            for k, v in (res.stats or {}).items():
                metrics[f"rewards/{name}/{k}"] = float(v)
        correct = [1.0 if s >= CORRECT_THRESHOLD else 0.0 for s in components[self.correctness]]
        metrics["rewards/total/mean"] = sum(total) / n if n else 0.0
        return RewardScores(total=total, components=components, correct=correct, metrics=metrics)

    def close(self) -> None:
        for r in getattr(self, "rewards", {}).values():
            try:
                r.close()
            except Exception:  # noqa: BLE001
                log.exception("closing reward %r failed", r)

    def __enter__(self) -> RewardSet:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        parts = ", ".join(f"{n}*{self.weights[n]:g}" for n in self.rewards)
        return f"RewardSet({parts}; correctness={self.correctness})"
