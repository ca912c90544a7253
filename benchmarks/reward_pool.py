"""Overhead of reward isolation: per-completion cost of scoring a trivial plugin in worker processes.

``python -m benchmarks.reward_pool`` builds a :class:`rewards.RewardSet` with one trivial plugin
(it returns 1.0; no work of its own), isolated with the default settings (2 workers, one task
per completion), scores ``--calls`` batches of ``--batch`` completions (groups of 8 sharing a
record, as in training) and prints the median wall time per call and per completion. Everything
it measures is the isolation's overhead: sending each completion and its record to a worker,
the time limit, the reply.

``--raw`` also times the two candidate libraries alone on a trivial function (128 tasks through
``pebble.ProcessPool.schedule`` with a timeout, and through
``concurrent.futures.ProcessPoolExecutor.submit``, both with the spawn start method), the cost a
pool built on either adds before any protocol of ours.
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import time

from rewards.base import Reward


class Trivial(Reward):
    """1.0 for every completion: the cost of a call is the isolation's alone."""

    def __init__(self):
        pass

    def score(self, completion: str, record: dict) -> float:
        return 1.0


def _noop(x):
    return x


def time_rewardset(batch: int, calls: int, workers: int) -> list[float]:
    from framework.registry import REWARDS
    from rewards import RewardSet

    # a module-level class a worker can import (this file may be __main__)
    cls = importlib.import_module("benchmarks.reward_pool").Trivial
    REWARDS.register("_bench_trivial", cls, override=True)
    comps = [f"<answer>{i}</answer>" for i in range(batch)]
    recs = [{"id": i // 8, "answer": "1", "question": "q" * 200} for i in range(batch)]
    recs = [recs[(i // 8) * 8] for i in range(batch)]  # a group of 8 shares one record object
    times = []
    with RewardSet(
        {"_bench_trivial": {"weight": 1.0, "isolate": {"workers": workers}}},
        correctness="_bench_trivial",
    ) as rs:
        rs(comps[:8], recs[:8])  # warm-up: workers started and serving
        for _ in range(calls):
            t0 = time.perf_counter()
            s = rs(comps, recs)
            times.append(time.perf_counter() - t0)
            assert s.components["_bench_trivial"] == [1.0] * batch
    return times


def time_raw(batch: int, calls: int, workers: int) -> dict[str, list[float]]:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    out: dict[str, list[float]] = {}
    ctx = multiprocessing.get_context("spawn")
    try:
        import pebble
    except ImportError:
        pebble = None
    if pebble is not None:
        pool = pebble.ProcessPool(max_workers=workers, context=ctx)
        [f.result() for f in [pool.schedule(_noop, (i,), timeout=10.0) for i in range(8)]]
        out["pebble.ProcessPool.schedule"] = []
        for _ in range(calls):
            t0 = time.perf_counter()
            [f.result() for f in [pool.schedule(_noop, (i,), timeout=10.0) for i in range(batch)]]
            out["pebble.ProcessPool.schedule"].append(time.perf_counter() - t0)
        pool.stop()
        pool.join()
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as ex:
        [f.result() for f in [ex.submit(_noop, i) for i in range(8)]]
        out["ProcessPoolExecutor.submit"] = []
        for _ in range(calls):
            t0 = time.perf_counter()
            [f.result() for f in [ex.submit(_noop, i) for i in range(batch)]]
            out["ProcessPoolExecutor.submit"].append(time.perf_counter() - t0)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=128, help="completions per call (default 128)")
    ap.add_argument("--calls", type=int, default=20, help="timed calls (default 20)")
    ap.add_argument("--workers", type=int, default=2, help="worker processes (default 2, the default setting)")
    ap.add_argument("--raw", action="store_true", help="also time pebble and ProcessPoolExecutor alone")
    a = ap.parse_args(argv)

    def show(what: str, times: list[float]) -> None:
        med = statistics.median(times)
        print(
            f"{what}: batch {a.batch}, {a.workers} workers: {med * 1e3:.1f} ms per call, "
            f"{med / a.batch * 1e6:.0f} us per completion (median of {len(times)}; "
            f"min {min(times) / a.batch * 1e6:.0f}, max {max(times) / a.batch * 1e6:.0f} us)"
        )

    show("RewardSet, isolated trivial plugin", time_rewardset(a.batch, a.calls, a.workers))
    if a.raw:
        for name, times in time_raw(a.batch, a.calls, a.workers).items():
            show(name, times)


if __name__ == "__main__":
    main()
