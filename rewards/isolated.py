"""A reward plugin run in worker processes under a per-task time limit: :class:`IsolatedReward`.

:class:`rewards.RewardSet` wraps every plugin that is not one of the project's own built-ins
(and any component with ``isolate: true``) in an :class:`IsolatedReward`. The plugin runs in a
:class:`rewards.pool.WorkerPool` (pebble's process pool, started with ``spawn``: the trainer's
``sys.path``): each worker imports the plugin's class by reference (``"module:qualname"``),
builds it once with the component's parameters and calls it on ``batch_size`` completions at
a time. ``batch_size`` is automatic by default: 1 for a plugin that scores one completion
(:meth:`Reward.score`: each completion is one call under ``timeout_s``), the whole batch for a
batch-aware plugin (one that overrides ``__call__``: a group-relative reward must see its
group; ``timeout_s`` then bounds the whole batch).

Per call, whatever the plugin does: a hang (past ``timeout_s``: interrupted, or its worker
killed after a grace period), an exception, ``SystemExit``, a crash of the process (segfault,
``os._exit``), an allocation past the worker's memory limit or a return value that is not a
real number scores 0.0 and counts in ``timeouts`` or ``failures`` with its message; a lost
worker is replaced (``stats["worker_restarts"]``) and its children are killed with it. What
the plugin prints goes to the trainer's stderr, at most ``max_output_kb`` per call (the rest
dropped with a note). Workers that cannot start at all (the module does not import there, the
constructor raises) raise a ConfigError at start, :class:`RewardFailure` later.
"""

from __future__ import annotations

import logging
import pickle
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from framework.errors import ConfigError

from .base import MAX_ERRORS, Reward, RewardFailure, RewardResult, _check_lengths, check_result, record_name
from .config import IsolationConfig
from .pool import WorkerPool, WorkerStartError, memory_limit_note, resolve, worker_ref

log = logging.getLogger(__name__)


def class_ref(cls: type, name: str) -> str:
    """``"module:qualname"`` by which a worker imports the reward class ``cls``; a ConfigError when it cannot."""
    hint = (
        f"define it at module level in an importable module (named in plugins=[...] or an entry "
        f"point), or set isolate: false on reward '{name}' to run it in the trainer process (no time limit)"
    )
    return worker_ref(cls, f"reward '{name}'", hint)


def is_batch_aware(cls: type) -> bool:
    """A plugin that scores a batch at once (it overrides ``Reward.__call__``)."""
    return cls.__call__ is not Reward.__call__


# --------------------------------------------------------------------------- worker side


class _PluginHandler:
    """Built once in each worker: the plugin; serves ``(completions, records)`` tasks."""

    def __init__(self, init: Mapping[str, Any]):
        self.plugin = resolve(init["cls"])(**dict(init["params"]))
        try:
            self.plugin.name = init["name"]
        except AttributeError:
            pass

    def __call__(self, item: tuple[list[str], list[dict]]) -> dict:
        completions, records = item
        res = check_result(self.plugin(completions, records), len(completions))
        note = memory_limit_note()  # a MemoryError the plugin caught itself (Reward.__call__ does)
        errors = [f"MemoryError: {note}" if note and m.startswith("MemoryError") else m for m in res.errors]
        return {
            "status": "ok",
            "scores": res.scores,
            "failures": res.failures,
            "timeouts": res.timeouts,
            "errors": errors,
            "stats": res.stats,
        }


# --------------------------------------------------------------------------- parent side


class IsolatedReward(Reward):
    """The reward plugin ``cls(**params)`` run in worker processes (see the module doc)."""

    isolated = True

    def __init__(self, name: str, cls: type, params: Mapping[str, Any] | None, options: IsolationConfig):
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
        self.options = options
        self.batch_aware = is_batch_aware(cls)
        self.max_output_bytes = options.max_output_kb * 1024
        self.pool = WorkerPool(
            "rewards.isolated:_PluginHandler",
            {"cls": self.ref, "params": self.params, "name": name},
            workers=options.workers,
            timeout_s=options.timeout_s,
            start_timeout_s=options.start_timeout_s,
            memory_limit_mb=options.memory_limit_mb,
            max_output_bytes=self.max_output_bytes,
            label=f"reward '{name}'",
        )

    def start(self) -> None:
        """Start the workers and build the plugin (its import and constructor errors raise a
        ConfigError here, before any model loads)."""
        try:
            self.pool.start()
        except WorkerStartError as e:
            raise ConfigError(f"reward '{self.name}' ({self.ref}) cannot run in a worker process: {e}") from e

    def batch_size(self, n: int) -> int:
        """Completions per plugin call for a batch of ``n``."""
        if self.options.batch_size is not None:
            return self.options.batch_size
        return max(1, n) if self.batch_aware else 1

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
        bs = self.batch_size(n)
        spans = [(s, min(n, s + bs)) for s in range(0, n, bs)]
        items = [(list(completions[s:e]), list(records[s:e])) for s, e in spans]
        bad = 0

        def stop(i: int, out: dict) -> bool:
            nonlocal bad
            s, e = spans[i]
            if out["status"] == "ok":
                bad += int(out["failures"]) + int(out["timeouts"])
            else:
                bad += e - s
            return max_bad is not None and bad > max_bad

        restarts0 = self.pool.restarts
        try:
            outs = self.pool.run(items, stop=stop)
        except WorkerStartError as e:
            raise RewardFailure(f"reward '{self.name}' ({self.ref}) cannot run in a worker process: {e}") from e
        self._forward_output(outs)
        for (s, e), out in zip(spans, outs):
            self._merge(res, s, e, out, records)
        res.stats["worker_restarts"] = float(self.pool.restarts - restarts0)
        return res

    def _merge(self, res: RewardResult, s: int, e: int, out: dict, records: Sequence[dict]) -> None:
        where = record_name(records[s]) if e - s == 1 else f"completions {s}..{e - 1}"
        status = out["status"]
        if status == "ok":
            try:
                part = check_result(
                    RewardResult(
                        scores=list(out["scores"]),
                        failures=out["failures"],
                        timeouts=out["timeouts"],
                        errors=list(out["errors"]),
                        stats=dict(out["stats"]),
                    ),
                    e - s,
                )
            except Exception as err:  # noqa: BLE001
                for _ in range(s, e):
                    res.add_failure(f"{type(err).__name__}: {err} ({where})")
                return
            res.scores[s:e] = part.scores
            res.failures += part.failures
            res.timeouts += part.timeouts
            for m in part.errors:
                if len(res.errors) < MAX_ERRORS:
                    res.errors.append(f"{m} ({where})")
            for k, v in part.stats.items():
                res.stats[k] = res.stats[k] + v if k in res.stats else v
        elif status == "timeout":
            how = "its worker was killed" if "hard" in out else "interrupted"
            for j in range(s, e):
                res.add_timeout(f"timed out after {self.options.timeout_s:g}s ({how}) ({record_name(records[j])})")
        elif status != "skipped":
            for j in range(s, e):
                res.add_failure(f"{out['error']} ({record_name(records[j])})")

    def _forward_output(self, outs: list[dict]) -> None:
        """What the plugin printed during this call, to stderr: the first ``max_output_kb``."""
        room, dropped = self.max_output_bytes, 0
        for out in outs:
            if "output" not in out:
                continue
            printed = out["output"]
            data = printed["text"].encode("utf-8", "replace")
            dropped += printed["dropped"] + max(0, len(data) - room)
            if room > 0:
                sys.stderr.write(data[:room].decode("utf-8", "replace"))
                room -= min(room, len(data))
        if dropped:
            sys.stderr.write("\n")
            log.warning(
                "reward '%s': %d more bytes of its output dropped (the first %d KiB of each call are "
                "kept: reward.isolation.max_output_kb)",
                self.name,
                dropped,
                self.options.max_output_kb,
            )
        sys.stderr.flush()

    def close(self) -> None:
        self.pool.close()

    def __repr__(self) -> str:
        o = self.options
        return (
            f"IsolatedReward({self.name}: {self.ref}, timeout_s={o.timeout_s:g}, workers={o.workers}, "
            f"batch_size={o.batch_size if o.batch_size is not None else 'auto'})"
        )


__all__ = ["IsolatedReward", "class_ref", "is_batch_aware"]
