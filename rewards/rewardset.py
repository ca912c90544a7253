""":class:`RewardSet`: the configured reward plugins combined into the total reward, the
correctness and metrics; :func:`is_builtin`, which plugins run in the trainer process."""

from __future__ import annotations

import logging
import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from framework.errors import ConfigError
from framework.registry import REWARDS

from .base import CORRECT_THRESHOLD, Reward, RewardFailure, RewardResult, _check_lengths, build_reward, check_params
from .base import check_result as _check_result
from .config import IsolationConfig, RewardConfig, isolation_fields, parse, parse_component
from .isolated import IsolatedReward
from .pool import PoolClosed

log = logging.getLogger(__name__)

_PACKAGE_DIR = Path(__file__).resolve().parent  # the installed `rewards` package
_ALWAYS_LOGGED = frozenset({"worker_restarts"})  # stats keys of the isolation itself, never capped


def is_builtin(cls: Any) -> bool:
    """A reward class shipped with this project: its module's file lies inside the installed
    ``rewards`` package. Trusted by where it comes from, not by its name: a module called
    ``rewards.x`` loaded from anywhere else is a plugin like any other (isolated by default)."""
    mod = sys.modules.get(getattr(cls, "__module__", None) or "")
    path = getattr(mod, "__file__", None)
    if not path:
        return False
    try:
        return Path(path).resolve().is_relative_to(_PACKAGE_DIR)
    except (OSError, ValueError):
        return False


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
    weight 0 (and added with weight 0 when it is not among the components). The other options
    are those of :class:`rewards.config.RewardConfig` (``reward.*``), whose defaults they take.

    **Isolation.** A plugin runs in worker processes under a per-task time limit
    (:class:`rewards.isolated.IsolatedReward`) unless it is one of the project's own built-ins
    (:func:`is_builtin`: ``format``, ``accuracy``, ``choice``, ``numeric``, ``length``;
    pure-Python checks on one bounded completion, and ``accuracy`` already runs math-verify in
    its own pool) or its component says ``isolate: false`` (a trusted, fast plugin: in-process,
    no time limit). ``isolate: true`` isolates a built-in; ``isolate: {timeout_s, workers, ...}``
    isolates with these settings over ``isolation`` (:class:`rewards.config.IsolationConfig`).
    Isolated plugins are built only in their workers, which start here (an import or
    constructor error is a ConfigError now, before any model loads).

    **Failures.** A completion whose scoring fails (exception, ``SystemExit``, crash of the
    worker, memory limit, a value that is not a real number, NaN) or times out scores 0.0 for
    that plugin, is counted in ``rewards/<name>/failures`` or ``rewards/<name>/timeouts`` and
    logged as a warning with the first errors. When more than ``max_failure_frac`` of the
    completions of one call fail or time out for one plugin, the call raises
    :class:`RewardFailure` naming the plugin and its first error (``max_failure_frac=1`` never
    stops). A plugin's extra counters (``RewardResult.stats``) are logged as
    ``rewards/<name>/<key>``, the first ``max_stat_keys`` distinct keys only (the rest dropped,
    reported once).

    **Calls.** ``rs(completions, records)`` scores synchronously, one plugin after the other
    (an isolated plugin's tasks run in parallel in its workers).
    """

    def __init__(
        self, components: Mapping[str, Mapping[str, Any] | None], correctness: str | None = None, **options: Any
    ):
        given = {"components": components, **options}
        if correctness is not None:
            given["correctness"] = correctness
        self.config: RewardConfig = parse(RewardConfig, given, "reward")
        self.rewards: dict[str, Reward] = {}
        self.weights: dict[str, float] = {}
        self.correctness = self.config.correctness
        self.max_failure_frac = self.config.max_failure_frac
        self.isolation: IsolationConfig = self.config.isolation
        self._stat_keys: dict[str, set[str]] = {}  # per plugin: the stats keys logged
        self._stats_warned: set[str] = set()
        self._closed = False
        try:
            items = [(str(k), v) for k, v in self.config.components.items()]
            if self.correctness not in {k for k, _ in items}:
                items.append((self.correctness, {"weight": 0.0}))
            for name, params in items:
                self.rewards[name], self.weights[name] = self._build(name, params)
        except BaseException:
            self.close()
            raise

    def _build(self, name: str, value: Mapping[str, Any] | None) -> tuple[Reward, float]:
        comp = parse_component(name, value)
        params, weight, isolate = comp.params, comp.weight, comp.isolate
        cls = REWARDS.get(name)  # UnknownNameError lists the registered names
        if isolate is None:
            isolate = not is_builtin(cls)
        if isinstance(isolate, Mapping):
            opts = parse(IsolationConfig, isolate, f"reward.components.{name}.isolate", base=self.isolation)
        elif isinstance(isolate, bool):
            opts = self.isolation
        else:
            raise ConfigError(
                f"reward '{name}': isolate must be true, false or a mapping "
                f"{{{', '.join(isolation_fields())}}}, got {isolate!r}"
            )
        if isolate is False:
            return build_reward(name, params), weight
        check_params(name, cls, params, reserved=["weight", "isolate"])  # checked here; built in its workers
        reward = IsolatedReward(name, cls, params, opts)
        try:
            reward.start()
        except BaseException:
            reward.close()
            raise
        return reward, weight

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | RewardConfig) -> RewardSet:
        """From the ``reward`` section (a mapping, e.g. the composed config's ``reward``, or a
        :class:`RewardConfig`); every key and value is checked (:func:`rewards.config.parse`)."""
        if isinstance(cfg, RewardConfig):
            config = cfg
        else:
            if not isinstance(cfg, Mapping):
                raise ConfigError(f"reward config must be a mapping, got {type(cfg).__name__}")
            if "components" not in cfg:
                raise ConfigError("the reward config needs 'components: {name: {weight: ...}}'")
            config = parse(RewardConfig, cfg, "reward")
        options = {k: v for k, v in vars(config).items() if k not in ("components", "correctness")}
        return cls(config.components, config.correctness, **options)

    # -- scoring
    def __call__(self, completions: Sequence[str], records: Sequence[dict]) -> RewardScores:
        """Score every completion with every plugin (see :class:`RewardScores`)."""
        _check_lengths(completions, records)
        if self._closed:
            raise RuntimeError("RewardSet is closed")
        completions, records = list(completions), list(records)
        n = len(completions)
        results = {name: self._score_one(reward, completions, records) for name, reward in self.rewards.items()}
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
            components[name] = res.scores
            w = self.weights[name]
            if w:
                for i, s in enumerate(res.scores):
                    total[i] += w * s
            metrics[f"rewards/{name}/mean"] = sum(res.scores) / n if n else 0.0
            metrics[f"rewards/{name}/failures"] = float(res.failures)
            metrics[f"rewards/{name}/timeouts"] = float(res.timeouts)
            for k, v in self._capped_stats(name, res.stats).items():
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

    def _score_one(self, reward: Reward, completions: list, records: list) -> RewardResult:
        n = len(completions)
        try:
            if reward.isolated:  # stops early once the call is bound to fail
                res = reward(completions, records, max_bad=math.floor(self.max_failure_frac * n))
            else:
                res = reward(list(completions), list(records))
            return _check_result(res, n)
        except (RewardFailure, PoolClosed):
            raise
        except (Exception, SystemExit) as e:  # noqa: BLE001 - the step goes on with zeros (SystemExit: an
            # in-process plugin asked the interpreter to exit)
            return RewardResult(scores=[0.0] * n, failures=n, errors=[f"{type(e).__name__}: {e}"])

    def _capped_stats(self, name: str, stats: Mapping[str, float]) -> dict[str, float]:
        """The first ``max_stat_keys`` distinct keys a plugin ever reported (each a metric
        column); keys past them are dropped and reported once per plugin."""
        seen = self._stat_keys.setdefault(name, set())
        out, dropped = {}, []
        for k, v in stats.items():
            if k in seen or k in _ALWAYS_LOGGED:
                out[k] = v
            elif len(seen) < self.config.max_stat_keys:
                seen.add(k)
                out[k] = v
            else:
                dropped.append(k)
        if dropped and name not in self._stats_warned:
            self._stats_warned.add(name)
            log.warning(
                "reward '%s' reports more than reward.max_stat_keys=%d counters; logging the first %d and "
                "dropping the rest, e.g. %s (reported once)",
                name,
                self.config.max_stat_keys,
                self.config.max_stat_keys,
                sorted(dropped)[:5],
            )
        return out

    def close(self) -> None:
        """Stop the plugins' workers. Safe to call more than once."""
        self._closed = True
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
            f"{n}*{self.weights[n]:g}{' (isolated)' if r.isolated else ''}" for n, r in self.rewards.items()
        )
        return f"RewardSet({parts}; correctness={self.correctness})"


__all__ = ["RewardScores", "RewardSet", "is_builtin"]
