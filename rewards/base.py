"""Reward plugin base class, the result type, answer extraction and :class:`RewardSet`.

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
step). Plugins that batch (``accuracy`` uses a worker pool) override ``__call__``.

:class:`RewardSet` combines the configured plugins into the total reward, the per-plugin
components, the correctness ``c_i`` (from one plugin alone, ``accuracy`` by default) and
metrics to log. It runs every plugin that is not one of the project's built-ins in worker
processes under a per-call time limit (:mod:`rewards.isolated`), stops the run with
:class:`RewardFailure` when a plugin fails on more than ``max_failure_frac`` of a batch, and
scores in the background (:meth:`RewardSet.submit`) so that rewards overlap generation.
"""

from __future__ import annotations

import inspect
import logging
import math
import numbers
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
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

    ``components`` maps a registered reward name to ``{weight: float, isolate: ..., **params}``.
    The total reward is ``sum(weight * score)``. Correctness ``c_i`` is 1.0 where the score of
    the ``correctness`` plugin is >= 1 - 1e-6, else 0.0; that plugin is computed even with
    weight 0 (and added with weight 0 when it is not among the components).

    **Isolation.** A plugin runs in worker processes under a per-call time limit
    (:class:`rewards.isolated.IsolatedReward`) unless it is one of the project's own built-ins
    (a class defined in the ``rewards`` package: ``format``, ``accuracy``, ``choice``,
    ``numeric``, ``length``; pure-Python checks on one bounded completion, and ``accuracy``
    already runs math-verify in its own pool) or its component says ``isolate: false`` (a
    trusted, fast plugin: in-process, no time limit). ``isolate: true`` isolates a built-in;
    ``isolate: {timeout_s, workers, batch_size, start_timeout_s}`` isolates with these
    settings over ``isolation`` (the defaults for all isolated plugins:
    :data:`rewards.isolated.ISOLATION_DEFAULTS`). Isolated plugins are built only in their
    workers, which start here (an import or constructor error is a ConfigError now, before
    any model loads).

    **Failures.** A completion whose scoring fails (exception, ``SystemExit``, crash of the
    worker, a value that is not a real number, NaN) or times out scores 0.0 for that plugin,
    is counted in ``rewards/<name>/failures`` or ``rewards/<name>/timeouts`` and logged as a
    warning with the first errors. When more than ``max_failure_frac`` of the completions of
    one call fail or time out for one plugin, the call raises :class:`RewardFailure` naming
    the plugin and its first error (``max_failure_frac=1`` never stops).

    **Overlap.** :meth:`submit` scores in background threads and returns a future, so the
    rewards of one round can be computed while the next round is generated; calls are scored
    in the order submitted, the plugins of one call in parallel. ``rs(c, r)`` is
    ``rs.submit(c, r).result()``.
    """

    def __init__(
        self,
        components: Mapping[str, Mapping[str, Any] | None],
        correctness: str = "accuracy",
        *,
        max_failure_frac: float = 0.5,
        isolation: Mapping[str, Any] | None = None,
    ):
        from .isolated import IsolatedReward, isolation_options

        if not isinstance(components, Mapping) or not components:
            raise ConfigError("RewardSet needs a non-empty mapping {reward_name: {weight, ...}}")
        self.rewards: dict[str, Reward] = {}
        self.weights: dict[str, float] = {}
        self.correctness = str(correctness)
        self.max_failure_frac = _fraction("reward.max_failure_frac", max_failure_frac)
        self.isolation = isolation_options("reward.isolation", isolation)
        self._lock = threading.Lock()
        self._executor: ThreadPoolExecutor | None = None
        self._plugin_executor: ThreadPoolExecutor | None = None
        self._closed = False
        try:
            items = [(str(k), v) for k, v in components.items()]
            if self.correctness not in {k for k, _ in items}:
                items.append((self.correctness, {"weight": 0.0}))
            for name, params in items:
                if params is not None and not isinstance(params, Mapping):
                    raise ConfigError(f"reward '{name}': expected a mapping {{weight, ...}}, got {params!r}")
                params = dict(params) if params is not None else {}
                weight = params.pop("weight", 1.0)
                try:
                    weight = float(weight)
                except (TypeError, ValueError):
                    raise ConfigError(f"reward '{name}': weight must be a number, got {weight!r}") from None
                if not math.isfinite(weight):
                    raise ConfigError(f"reward '{name}': weight must be finite, got {weight}")
                isolate = params.pop("isolate", None)
                cls = REWARDS.get(name)  # UnknownNameError lists the registered names
                if isolate is None:
                    isolate = not is_builtin(cls)
                if isinstance(isolate, Mapping):
                    opts, isolate = (
                        isolation_options(f"reward.components.{name}.isolate", isolate, self.isolation),
                        True,
                    )
                elif isinstance(isolate, bool):
                    opts = self.isolation
                else:
                    raise ConfigError(
                        f"reward '{name}': isolate must be true, false or a mapping "
                        f"{{timeout_s, workers, batch_size, start_timeout_s}}, got {isolate!r}"
                    )
                if isolate:
                    _check_params(name, cls, params)
                    reward = IsolatedReward(name, cls, params, **opts)
                    self.rewards[name] = reward
                    reward.start()
                else:
                    self.rewards[name] = build_reward(name, params)
                self.weights[name] = weight
        except BaseException:
            self.close()
            raise

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> RewardSet:
        """From ``{correctness: str, components: {name: {weight, isolate, **params}},
        max_failure_frac: float, isolation: {timeout_s, workers, batch_size, start_timeout_s}}``."""
        if not isinstance(cfg, Mapping):
            raise ConfigError(f"reward config must be a mapping, got {type(cfg).__name__}")
        allowed = ("correctness", "components", "max_failure_frac", "isolation")
        unknown = sorted(set(cfg) - set(allowed))
        if unknown:
            raise ConfigError(f"unknown key(s) {unknown} in the reward config; allowed: {list(allowed)}")
        if "components" not in cfg:
            raise ConfigError("the reward config needs 'components: {name: {weight: ...}}'")
        return cls(
            cfg["components"],
            correctness=cfg.get("correctness", "accuracy"),
            max_failure_frac=cfg.get("max_failure_frac", 0.5),
            isolation=cfg.get("isolation"),
        )

    # -- scoring
    def submit(self, completions: Sequence[str], records: Sequence[dict]) -> Future:
        """Start scoring in the background; a ``Future`` of :class:`RewardScores` (its
        ``result()`` raises :class:`RewardFailure` as ``__call__`` would). The lists are
        copied now: the caller may reuse them."""
        _check_lengths(completions, records)
        completions, records = list(completions), list(records)
        with self._lock:
            if self._closed:
                raise RuntimeError("RewardSet is closed")
            if self._executor is None:
                self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rewards")
                self._plugin_executor = ThreadPoolExecutor(
                    max_workers=len(self.rewards), thread_name_prefix="reward-plugin"
                )
            return self._executor.submit(self._score, completions, records)

    def __call__(self, completions: Sequence[str], records: Sequence[dict]) -> RewardScores:
        """Score every completion with every plugin (see :class:`RewardScores`)."""
        return self.submit(completions, records).result()

    def _score_one(self, name: str, reward: Reward, completions: list, records: list) -> RewardResult:
        n = len(completions)
        try:
            if getattr(reward, "isolated", False):  # stops early once the call is bound to fail
                res = reward(completions, records, max_bad=math.floor(self.max_failure_frac * n))
            else:
                res = reward(list(completions), list(records))
            return check_result(res, n)
        except RewardFailure:
            raise
        except (Exception, SystemExit) as e:  # noqa: BLE001 - the step goes on with zeros (SystemExit: an
            # in-process plugin asked the interpreter to exit from a reward thread)
            return RewardResult(scores=[0.0] * n, failures=n, errors=[f"{type(e).__name__}: {e}"])

    def _score(self, completions: list, records: list) -> RewardScores:
        n = len(completions)
        futures = {
            name: self._plugin_executor.submit(self._score_one, name, reward, completions, records)
            for name, reward in self.rewards.items()
        }
        results = {name: f.result() for name, f in futures.items()}
        total = [0.0] * n
        components: dict[str, list[float]] = {}
        metrics: dict[str, float] = {}
        over: list[tuple[str, RewardResult]] = []
        for name, res in results.items():
            if res.failures or res.timeouts:
                log.warning(
                    "reward '%s': %d failures, %d timeouts of %d completions (scored 0); first error: %s",
                    name,
                    res.failures,
                    res.timeouts,
                    n,
                    "; ".join(res.errors[:3]) or "(none recorded)",
                )
                if n and res.failures + res.timeouts > self.max_failure_frac * n:
                    over.append((name, res))
            scores = res.scores
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
        if over:
            name, res = over[0]
            first = res.errors[0] if res.errors else "(no message)"
            raise RewardFailure(
                f"reward '{name}' failed or timed out on {res.failures + res.timeouts} of {n} completions "
                f"({res.failures} failures, {res.timeouts} timeouts), more than reward.max_failure_frac="
                f"{self.max_failure_frac:g}; first error: {first}. Fix the plugin, or raise "
                f"reward.max_failure_frac (1 never stops) or its isolate.timeout_s"
            )
        correct = [1.0 if s >= CORRECT_THRESHOLD else 0.0 for s in components[self.correctness]]
        metrics["rewards/total/mean"] = sum(total) / n if n else 0.0
        return RewardScores(total=total, components=components, correct=correct, metrics=metrics)

    def close(self) -> None:
        """Stop the background threads and the plugins' workers. Safe to call more than once."""
        lock = getattr(self, "_lock", None)
        if lock is not None:
            with lock:
                self._closed = True
                ex, pex = self._executor, self._plugin_executor
                self._executor = self._plugin_executor = None
            for e in (ex, pex):
                if e is not None:
                    e.shutdown(wait=False, cancel_futures=True)
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
        parts = ", ".join(
            f"{n}*{self.weights[n]:g}{' (isolated)' if getattr(r, 'isolated', False) else ''}"
            for n, r in self.rewards.items()
        )
        return f"RewardSet({parts}; correctness={self.correctness})"


def is_builtin(cls: Any) -> bool:
    """A reward class defined in this project's ``rewards`` package (run in-process by default)."""
    mod = getattr(cls, "__module__", "") or ""
    return mod == "rewards" or mod.startswith("rewards.")


def _fraction(key: str, value: Any) -> float:
    try:
        if isinstance(value, (bool, str, bytes)):
            raise TypeError
        v = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key} must be a number in [0, 1], got {value!r}") from None
    if not 0.0 <= v <= 1.0:
        raise ConfigError(f"{key} must be in [0, 1] (1 never stops the run), got {value!r}")
    return v


def _check_params(name: str, cls: type, params: Mapping[str, Any]) -> None:
    """Parameter names of an isolated plugin, checked against its constructor in the parent
    (the plugin itself is built only in its workers)."""
    accepted = accepted_params(cls)
    if accepted is not None:
        unknown = sorted(set(params) - set(accepted))
        if unknown:
            raise ConfigError(
                f"reward '{name}' ({cls.__module__}.{cls.__qualname__}) got unknown parameter(s) "
                f"{unknown}; accepted parameters: {['weight', 'isolate'] + accepted}"
            )
