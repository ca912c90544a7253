"""Misbehaving reward plugins for tests/test_reward_isolation.py.

They live at module level in a module of their own so that the worker processes of an
isolated reward can import them (``reward_plugins_for_tests:Misbehaving``, with the test
process's ``sys.path``). The tests register them under names of their own.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import time

from rewards.base import Reward, RewardResult


class Misbehaving(Reward):
    """1.0 for a completion ``"ok"``; otherwise does what the completion says."""

    def __init__(self, sleep_s: float = 0.3):
        self.sleep_s = float(sleep_s)

    def score(self, completion: str, record: dict):
        what = completion.strip()
        if what == "ok":
            return 1.0
        if what == "hang":  # a Python-level hang: interrupted by the worker's timer
            time.sleep(600)
        if what == "hard_hang":  # ignores the timer: the worker is killed
            signal.signal(signal.SIGALRM, signal.SIG_IGN)
            time.sleep(600)
        if what == "swallow":  # catches the interrupt and goes on hanging
            while True:
                try:
                    time.sleep(600)
                except BaseException:  # noqa: BLE001, S110
                    pass
        if what == "exit":
            raise SystemExit(3)
        if what == "os_exit":
            os._exit(3)
        if what == "segv":
            os.kill(os.getpid(), signal.SIGSEGV)
        if what == "null":
            ctypes.string_at(0)
        if what == "boom":
            raise RuntimeError("kaboom")
        if what == "string":
            return "7"
        if what == "none":
            return None
        if what == "nan":
            return float("nan")
        if what == "bool":
            return True
        if what == "slow":
            time.sleep(self.sleep_s)
            return 0.5
        if what == "alloc":  # 1 GiB at once: past a small memory limit
            return float(len(bytearray(1 << 30)) > 0)
        if what == "hello":
            print("hello from the plugin")
            return 1.0
        if what == "print":  # 100 KiB to stdout, 100 KiB to stderr
            for stream in (sys.stdout, sys.stderr):
                for _ in range(100):
                    stream.write("x" * 1023 + "\n")
            return 1.0
        if what in ("fork", "fork_segv"):  # a child that would sleep for 10 minutes
            pid = os.fork()
            if pid == 0:
                time.sleep(600)
                os._exit(0)
            with open(record["pidfile"], "a") as f:
                f.write(f"{pid}\n")
            if what == "fork_segv":
                os.kill(os.getpid(), signal.SIGSEGV)
            return 1.0
        raise ValueError(f"unknown instruction {what!r}")


class PidReward(Reward):
    """1.0 when scored in the process whose pid the record names (i.e. in-process)."""

    def __init__(self):
        pass

    def score(self, completion: str, record: dict) -> float:
        return 1.0 if os.getpid() == record["pid"] else 0.0


class BadInit(Reward):
    def __init__(self, level: int = 1):
        raise ValueError(f"level {level} is not supported")

    def score(self, completion: str, record: dict) -> float:
        return 0.0


class WrongLength(Reward):
    """A batching plugin (its own ``__call__``) that returns one score too few."""

    def __init__(self):
        pass

    def __call__(self, completions, records):
        return RewardResult(scores=[1.0] * (len(completions) - 1))


class GroupLongest(Reward):
    """Group-relative (batch-aware: its own ``__call__``): 1.0 for the longest completion(s) of
    each group (records with the same ``group``), 0.0 for the others."""

    def __init__(self):
        pass

    def __call__(self, completions, records):
        longest: dict = {}
        for c, r in zip(completions, records):
            longest[r["group"]] = max(longest.get(r["group"], 0), len(c))
        return RewardResult(scores=[float(len(c) == longest[r["group"]]) for c, r in zip(completions, records)])


class ManyStats(Reward):
    """Batch-aware; reports 40 counters named after the first completion (``a00`` ... ``a39``)."""

    def __init__(self):
        pass

    def __call__(self, completions, records):
        return RewardResult(scores=[1.0] * len(completions), stats={f"{completions[0]}{i:02d}": 1.0 for i in range(40)})
