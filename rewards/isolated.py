"""A reward plugin run in worker processes under a per-call time limit: :class:`IsolatedReward`.

:class:`rewards.base.RewardSet` wraps every plugin that is not one of the project's own
built-ins (and any component with ``isolate: true``) in an :class:`IsolatedReward`. The
plugin runs in a :class:`rewards.workers.WorkerPool`: each worker is a fresh process of the
same Python with the trainer's ``sys.path``; it imports the plugin's class by reference
(``"module:qualname"``), builds it with the component's parameters and serves requests of
``batch_size`` completions (1 by default: each completion is one call of the plugin, under
``timeout_s``). Each distinct record is sent to a worker once per batch.

Per completion, whatever the plugin does: a hang (past ``timeout_s``: interrupted, or its
worker killed after a grace period), an exception, ``SystemExit``, a crash of the process
(segfault, ``os._exit``) or a return value that is not a real number scores 0.0 and counts
in ``timeouts`` or ``failures`` with its message; a lost worker is replaced
(``stats["worker_restarts"]``). Workers that cannot start at all (the module does not
import there, the constructor raises) raise :class:`RewardFailure` (a user error).
"""

from __future__ import annotations

import inspect
import logging
import pickle
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from framework.errors import ConfigError

from .base import MAX_ERRORS, Reward, RewardFailure, RewardResult, _check_lengths, check_result, record_name
from .workers import PoolClosed, WorkerPool, WorkerStartError, resolve

log = logging.getLogger(__name__)

ISOLATION_DEFAULTS: dict[str, Any] = {"timeout_s": 10.0, "workers": 2, "batch_size": 1, "start_timeout_s": 120.0}


def isolation_options(where: str, value: Mapping[str, Any] | None, base: Mapping[str, Any] | None = None) -> dict:
    """``base`` updated with ``value`` and checked: ``timeout_s > 0``, ``workers >= 1``,
    ``batch_size >= 1``, ``start_timeout_s > 0``; unknown keys fail with the allowed ones."""
    out = dict(base or ISOLATION_DEFAULTS)
    if value is None:
        return out
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where} must be a mapping {{{', '.join(ISOLATION_DEFAULTS)}}}, got {value!r}")
    unknown = sorted(set(value) - set(ISOLATION_DEFAULTS))
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown} in {where}; allowed: {list(ISOLATION_DEFAULTS)}")
    for key, v in value.items():
        kind = int if key in ("workers", "batch_size") else float
        try:
            if isinstance(v, bool) or (kind is int and float(v) != int(v)):
                raise ValueError
            v = kind(v)
        except (TypeError, ValueError):
            raise ConfigError(
                f"{where}.{key} must be {'an integer' if kind is int else 'a number'}, got {v!r}"
            ) from None
        if (kind is int and v < 1) or (kind is float and not v > 0) or v != v:
            raise ConfigError(f"{where}.{key} must be {'>= 1' if kind is int else '> 0'}, got {v!r}")
        out[key] = v
    return out


def class_ref(cls: type, name: str) -> str:
    """``"module:qualname"`` by which a worker imports ``cls``; a ConfigError when it cannot."""
    mod, qual = getattr(cls, "__module__", None), getattr(cls, "__qualname__", None)
    hint = (
        f"define it at module level in an importable module (named in plugins=[...] or an entry "
        f"point), or set isolate: false on reward '{name}' to run it in the trainer process (no time limit)"
    )
    if not inspect.isclass(cls) or not mod or not qual:
        raise ConfigError(f"reward '{name}' is registered as {cls!r}, not a class; a worker cannot build it: {hint}")
    if "<locals>" in qual or mod == "__main__":
        where = "inside a function" if "<locals>" in qual else "in the __main__ script"
        raise ConfigError(
            f"reward '{name}' ({mod}.{qual}) is defined {where}, so a worker process cannot import it: {hint}"
        )
    try:
        found = resolve(f"{mod}:{qual}")
    except Exception as e:  # noqa: BLE001
        raise ConfigError(f"reward '{name}': {mod}:{qual} does not import ({type(e).__name__}: {e}): {hint}") from e
    if found is not cls:
        raise ConfigError(f"reward '{name}': {mod}:{qual} names another object than the registered class: {hint}")
    return f"{mod}:{qual}"


# --------------------------------------------------------------------------- worker side


class _PluginHandler:
    def __init__(self, init: Mapping[str, Any]):
        cls = resolve(init["cls"])
        self.plugin = cls(**dict(init.get("params") or {}))
        try:
            self.plugin.name = init.get("name", "")
        except AttributeError:
            pass

    def __call__(self, req: dict) -> dict:
        shared = req["shared"]
        completions = list(req["completions"])
        records = [shared[k] for k in req["refs"]]
        res = check_result(self.plugin(completions, records), len(completions))
        return {
            "status": "ok",
            "scores": res.scores,
            "failures": res.failures,
            "timeouts": res.timeouts,
            "errors": res.errors,
            "stats": res.stats,
        }


def _plugin_handler(init: Mapping[str, Any]) -> Callable[[dict], dict]:
    return _PluginHandler(init)


# --------------------------------------------------------------------------- parent side


class IsolatedReward(Reward):
    """The reward plugin ``cls(**params)`` run in worker processes (see the module doc)."""

    isolated = True

    def __init__(
        self,
        name: str,
        cls: type,
        params: Mapping[str, Any] | None = None,
        *,
        timeout_s: float = ISOLATION_DEFAULTS["timeout_s"],
        workers: int = ISOLATION_DEFAULTS["workers"],
        batch_size: int = ISOLATION_DEFAULTS["batch_size"],
        start_timeout_s: float = ISOLATION_DEFAULTS["start_timeout_s"],
    ):
        self.name = name
        self.plugin_class = cls
        self.ref = class_ref(cls, name)
        self.params = dict(params or {})
        try:
            pickle.dumps(self.params)
        except Exception as e:  # noqa: BLE001
            raise ConfigError(
                f"reward '{name}': its parameters cannot be sent to a worker process ({e}); "
                "use plain values, or set isolate: false"
            ) from e
        self.timeout_s, self.workers, self.batch_size = float(timeout_s), int(workers), int(batch_size)
        self.pool = WorkerPool(
            "rewards.isolated:_plugin_handler",
            {"cls": self.ref, "params": self.params, "name": name},
            workers=self.workers,
            timeout_s=self.timeout_s,
            label=f"reward '{name}'",
            start_timeout_s=start_timeout_s,
        )

    def start(self) -> None:
        """Start the workers and build the plugin in each (its import and constructor errors
        raise a ConfigError here, before any model loads)."""
        try:
            self.pool.start()
        except WorkerStartError as e:
            raise ConfigError(f"reward '{self.name}' ({self.ref}) cannot run in a worker process: {e}") from e

    def __call__(
        self, completions: Sequence[str], records: Sequence[dict], *, max_bad: int | None = None
    ) -> RewardResult:
        """Score in the workers. ``max_bad``: stop early (the rest scored 0, uncounted) once more
        than this many completions failed or timed out; the caller then stops the run."""
        _check_lengths(completions, records)
        n = len(completions)
        res = RewardResult(scores=[0.0] * n)
        if n == 0:
            return res
        shared: list[Any] = []
        index: dict[int, int] = {}
        refs = []
        for r in records:  # the G completions of a group share one record object: sent once
            k = index.get(id(r))
            if k is None:
                k = index[id(r)] = len(shared)
                shared.append(r)
            refs.append(k)
        bs = self.batch_size
        spans = [(s, min(n, s + bs)) for s in range(0, n, bs)]
        items = [{"completions": list(completions[s:e]), "refs": refs[s:e]} for s, e in spans]
        bad = [0]

        def stop(i: int, out: dict) -> bool:
            s, e = spans[i]
            if out.get("status") == "ok":
                bad[0] += int(out.get("failures", 0) or 0) + int(out.get("timeouts", 0) or 0)
            else:
                bad[0] += e - s
            return max_bad is not None and bad[0] > max_bad

        restarts0 = self.pool.restarts
        try:
            outs = self.pool.run(items, shared, stop=stop)
        except WorkerStartError as e:
            raise RewardFailure(f"reward '{self.name}' ({self.ref}) cannot run in a worker process: {e}") from e
        for (s, e), out in zip(spans, outs):
            where = record_name(records[s]) if e - s == 1 else f"completions {s}..{e - 1}"
            status = out.get("status")
            if status == "ok":
                try:
                    part = check_result(
                        RewardResult(
                            scores=list(out.get("scores") or []),
                            failures=int(out.get("failures", 0) or 0),
                            timeouts=int(out.get("timeouts", 0) or 0),
                            errors=[str(m) for m in out.get("errors") or []],
                            stats=dict(out.get("stats") or {}),
                        ),
                        e - s,
                    )
                except Exception as err:  # noqa: BLE001
                    for _ in range(s, e):
                        res.add_failure(f"{type(err).__name__}: {err} ({where})")
                    continue
                res.scores[s:e] = part.scores
                res.failures += part.failures
                res.timeouts += part.timeouts
                for m in part.errors:
                    if len(res.errors) < MAX_ERRORS:
                        res.errors.append(f"{m} ({where})")
                for k, v in part.stats.items():
                    res.stats[k] = res.stats.get(k, 0.0) + v
            elif status == "timeout":
                how = "its worker was killed" if out.get("hard") else "interrupted"
                for j in range(s, e):
                    res.add_timeout(f"timed out after {self.timeout_s:g}s ({how}) ({record_name(records[j])})")
            elif status == "skipped":
                continue
            else:
                for j in range(s, e):
                    res.add_failure(f"{out.get('error', 'unknown error')} ({record_name(records[j])})")
        res.stats["worker_restarts"] = float(self.pool.restarts - restarts0)
        return res

    def close(self) -> None:
        self.pool.close()

    def __repr__(self) -> str:
        return (
            f"IsolatedReward({self.name}: {self.ref}, timeout_s={self.timeout_s:g}, workers={self.workers}, "
            f"batch_size={self.batch_size})"
        )


__all__ = ["IsolatedReward", "ISOLATION_DEFAULTS", "PoolClosed", "class_ref", "isolation_options"]
