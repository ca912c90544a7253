"""Worker processes with a per-task time limit, on pebble's ``ProcessPool``: the pool behind
math-verify (:class:`rewards.verify.VerifyPool`) and isolated reward plugins
(:mod:`rewards.isolated`).

pebble (https://github.com/noxdafox/pebble) runs the processes: it kills a worker whose task
runs past its time limit and replaces it, reports a worker that dies mid-task (segfault,
``os._exit``) as ``ProcessExpired`` with its exit code, and replaces it. Chosen over
``concurrent.futures.ProcessPoolExecutor``, which can neither stop a task that hangs nor lose a
worker without breaking the whole pool (``BrokenProcessPool`` for every pending task), at about
the same cost per task (benchmarks/RESULTS.md, "Reward isolation on pebble"). What this module
adds:

* workers are started with ``spawn`` (a fresh interpreter: no fork of a CUDA process or of the
  trainer's threads); each builds its *handler* once in pebble's initializer, from a factory
  named ``"module:qualname"``, so imports and a plugin's constructor are not timed as a task. A
  factory that fails is reported by every task (``WorkerStartError``: the caller stops);
* soft timeout: a task arms ``setitimer(ITIMER_REAL, timeout_s)`` in its worker; a Python-level
  hang is interrupted and reported as a timeout, and the worker goes on;
* hard timeout: a task still running ``timeout_s + grace_s`` after it started (a hang in C, a
  plugin swallowing the interrupt) has its worker killed by pebble and replaced; a timeout;
* bounds: each worker is the leader of its own session and process group, and the group dies
  with it (pebble's SIGTERM kills the group; a tiny reaper process, told by the kernel when the
  worker dies however it dies, kills what is left), so a plugin's children never outlive its
  worker; an address-space limit (``RLIMIT_AS``) on top of the worker's size at start; the
  output of a task (stdout and stderr, to a temporary file) is returned with its result, capped.
"""

from __future__ import annotations

import ctypes
import fcntl
import importlib
import logging
import multiprocessing
import os
import re
import resource
import signal
import sys
import tempfile
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, CancelledError, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Any

import pebble

from framework.errors import ConfigError

log = logging.getLogger(__name__)

_MAX_ERROR_CHARS = 500


class WorkerStartError(RuntimeError):
    """Workers that cannot start (their handler fails to import or to build, or they do not
    start in time)."""


class PoolClosed(RuntimeError):
    """The pool was closed (while a call was running, or before it)."""


def resolve(path: str) -> Any:
    """``"package.module:Qual.name"`` -> the object."""
    mod, _, qual = path.partition(":")
    obj: Any = importlib.import_module(mod)
    for part in qual.split(".") if qual else ():
        obj = getattr(obj, part)
    return obj


def describe_exit(rc: int | None) -> str:
    if rc is None:
        return "still running"
    if rc < 0:
        try:
            return f"killed by signal {signal.Signals(-rc).name}"
        except ValueError:
            return f"killed by signal {-rc}"
    return f"exit code {rc}"


def _error_text(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"[:_MAX_ERROR_CHARS]


# --------------------------------------------------------------------------- worker side

_WORKER: dict[str, Any] = {}  # this worker's handler (or start error), limits and output file


class _SoftTimeout(BaseException):
    """Raised by SIGALRM in a worker; BaseException so ``except Exception`` in a handler
    (math-verify, a plugin) cannot swallow it."""


def _on_alarm(signum, frame):
    raise _SoftTimeout()


def _kill_group(*_):
    os.killpg(0, signal.SIGKILL)  # this worker, its reaper and every child a plugin started


def _vm_size_bytes() -> int | None:
    try:
        with open("/proc/self/status") as f:
            m = re.search(r"^VmSize:\s+(\d+) kB", f.read(), re.M)
        return int(m.group(1)) * 1024 if m else None
    except OSError:
        return None


def _start_reaper() -> None:
    """A child that sleeps until this worker dies (the kernel's parent-death signal, however
    the worker dies: SIGKILL, segfault, ``os._exit``), then kills the worker's process group."""
    if not sys.platform.startswith("linux"):
        return
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return
    worker = os.getpid()
    if os.fork() != 0:
        return
    try:  # the reaper: no Python-level cleanup of the worker's state, ever
        signal.signal(signal.SIGTERM, _kill_group)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
        for fd in os.listdir("/proc/self/fd"):  # hold none of the worker's pipes open
            if int(fd) > 2:
                try:
                    os.close(int(fd))
                except OSError:
                    pass
        if os.getppid() != worker:  # the worker died before the signal was armed
            _kill_group()
        while True:
            signal.pause()
    finally:
        os._exit(0)


def _init_worker(spec: dict) -> None:
    """pebble's initializer, once per worker: bounds, then the handler."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's business
    try:
        os.setsid()  # its own session and process group: killed as a group
        signal.signal(signal.SIGTERM, _kill_group)  # pebble stops a worker with SIGTERM
        _start_reaper()
    except OSError:
        pass
    limit_mb = spec["memory_limit_mb"]
    if limit_mb:
        size = _vm_size_bytes()
        if size is not None:
            cap = size + int(limit_mb) * 2**20
            _, hard = resource.getrlimit(resource.RLIMIT_AS)
            if hard != resource.RLIM_INFINITY:
                cap = min(cap, hard)
            resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    _WORKER.update(memory_limit_mb=limit_mb, label=spec["label"])
    if spec["capture_output"]:
        with tempfile.TemporaryFile() as out:  # unlinked: gone with the worker
            fd = os.dup(out.fileno())
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_APPEND)
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001, S110
                pass
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        _WORKER["out_fd"] = fd
    try:
        _WORKER["handler"] = resolve(spec["factory"])(spec["init"])
    except BaseException as e:  # noqa: BLE001 - every task reports it; the parent stops
        _WORKER["start_error"] = _memory_text(e) if isinstance(e, MemoryError) else _error_text(e)


def memory_limit_note() -> str | None:
    """In a worker with a memory limit: what a MemoryError there means (else None)."""
    mb = _WORKER.get("memory_limit_mb")
    if not mb:
        return None
    return (
        f"went past the worker's memory limit ({mb} MiB on top of its size at start: reward.isolation.memory_limit_mb)"
    )


def _memory_text(e: MemoryError) -> str:
    note = memory_limit_note()
    return (f"MemoryError: {note or ''}{': ' + str(e) if str(e) else ''}")[:_MAX_ERROR_CHARS]


def _take_output(max_bytes: int) -> dict | None:
    """What the task wrote to stdout/stderr: its first ``max_bytes`` and the count dropped."""
    fd = _WORKER.get("out_fd")
    if fd is None:
        return None
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001, S110
            pass
    size = os.fstat(fd).st_size
    if not size:
        return None
    data = os.pread(fd, max_bytes, 0)
    os.ftruncate(fd, 0)  # O_APPEND: the next write starts at 0 again
    return {"text": data.decode("utf-8", "replace"), "dropped": size - len(data)}


def _ping() -> dict:
    if "start_error" in _WORKER:
        return {"status": "start_error", "error": _WORKER["start_error"]}
    return {"status": "ok"}


def _run_task(item: Any, timeout_s: float, max_output: int) -> dict:
    """One task in a worker: the handler under the soft timeout; always a dict."""
    if "start_error" in _WORKER:
        return {"status": "start_error", "error": _WORKER["start_error"]}
    try:
        try:
            signal.signal(signal.SIGALRM, _on_alarm)
            signal.setitimer(signal.ITIMER_REAL, timeout_s)
            res = _WORKER["handler"](item)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        if not isinstance(res, dict):
            res = {"status": "error", "error": f"handler returned {type(res).__name__}, not a dict"}
    except _SoftTimeout:
        res = {"status": "timeout"}
    except MemoryError as e:
        res = {"status": "error", "error": _memory_text(e)}
    except BaseException as e:  # noqa: BLE001 - SystemExit too: reported, the worker goes on
        res = {"status": "error", "error": _error_text(e)}
    out = _take_output(max_output)
    if out is not None:
        res["output"] = out
    return res


# --------------------------------------------------------------------------- parent side


class WorkerPool:
    """Persistent workers running a handler with a per-task time limit. Thread-safe (one call
    at a time); the workers start on :meth:`start` or the first :meth:`run`.

    ``factory``: ``"module:qualname"`` of ``f(init) -> handle``, run once in each worker, where
    ``handle(item) -> dict`` serves one item. :meth:`run` returns one dict per item, in order,
    with ``status`` in ``ok | timeout | error | skipped`` (``error`` then holds the message; a
    hard timeout also has ``hard: True``; ``output``: what the task printed, when captured).
    """

    def __init__(
        self,
        factory: str,
        init: Any = None,
        *,
        workers: int,
        timeout_s: float,
        start_timeout_s: float,
        grace_s: float | None = None,
        memory_limit_mb: int | None = None,
        max_output_bytes: int | None = None,
        label: str = "worker",
    ):
        if workers < 1:
            raise ConfigError(f"{label}: a worker pool needs workers >= 1, got {workers}")
        if not timeout_s > 0:
            raise ConfigError(f"{label}: timeout_s must be > 0, got {timeout_s}")
        self.label, self.num_workers = label, int(workers)
        self.timeout_s = float(timeout_s)
        self.grace_s = float(grace_s) if grace_s is not None else min(2.0, max(0.5, self.timeout_s))
        self.start_timeout_s = float(start_timeout_s)
        self.max_output_bytes = max_output_bytes
        self._spec = {
            "factory": factory,
            "init": init,
            "memory_limit_mb": memory_limit_mb,
            "capture_output": max_output_bytes is not None,
            "label": label,
        }
        self._pool: pebble.ProcessPool | None = None
        self._lock = threading.Lock()
        self._closed = False
        self.restarts = 0  # workers replaced (killed at a hard timeout, or died mid-task)

    # -- lifecycle
    def start(self) -> None:
        """Start the workers now and wait until one is ready (a factory error raises
        :class:`WorkerStartError` here)."""
        with self._lock:
            self._ensure_pool()

    def _ensure_pool(self) -> pebble.ProcessPool:
        if self._closed:
            raise PoolClosed(f"{self.label}: the worker pool is closed")
        if self._pool is not None and self._pool.active:
            return self._pool
        if self._pool is not None:  # broken (a worker died while idle): start afresh
            self._stop(self._pool)
        self._pool = pebble.ProcessPool(
            max_workers=self.num_workers,
            initializer=_init_worker,
            initargs=(self._spec,),
            context=multiprocessing.get_context("spawn"),
        )
        ping = self._pool.schedule(_ping)
        done, _ = wait([ping], timeout=self.start_timeout_s)
        if not done:
            self._stop_quietly()
            raise WorkerStartError(f"{self.label}: a worker did not start in {self.start_timeout_s:.0f}s")
        try:
            out = ping.result()
        except BaseException as e:  # noqa: BLE001 - died while starting (a crash at import)
            self._stop_quietly()
            raise WorkerStartError(f"{self.label}: workers fail to start: {_outcome_text(e)}") from None
        if out["status"] != "ok":
            self._stop_quietly()
            raise WorkerStartError(f"{self.label}: workers fail to start: {out['error']}")
        return self._pool

    @staticmethod
    def _stop(pool: pebble.ProcessPool) -> None:
        pool.stop()
        pool.join(timeout=10)

    def _stop_quietly(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            try:
                self._stop(pool)
            except Exception:  # noqa: BLE001
                log.exception("%s: stopping the worker pool failed", self.label)

    def close(self) -> None:
        """Stop the workers (and their children); a call in progress on another thread stops
        within a second (:class:`PoolClosed`). Safe to call more than once."""
        self._closed = True
        self._stop_quietly()

    @property
    def closed(self) -> bool:
        return self._closed

    # -- work
    def run(self, items: Sequence[Any], stop: Callable[[int, dict], bool] | None = None) -> list[dict]:
        """One dict per item (see the class doc). ``stop(i, result)``, called on each result,
        may end the call early: the items not done by then are cancelled (a running one has
        its worker replaced) and get ``{"status": "skipped"}``."""
        with self._lock:
            pool = self._ensure_pool()
            futures = [
                pool.schedule(
                    _run_task,
                    args=(item, self.timeout_s, self.max_output_bytes or 0),
                    timeout=self.timeout_s + self.grace_s,
                )
                for item in items
            ]
            index = {f: i for i, f in enumerate(futures)}
            results: list[dict | None] = [None] * len(items)
            pending = set(futures)
            try:
                while pending:
                    if self._closed:
                        raise PoolClosed(f"{self.label}: the worker pool was closed during a call")
                    done, pending = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
                    stopping = False
                    for f in sorted(done, key=index.__getitem__):
                        i = index[f]
                        results[i] = self._outcome(f)
                        if stop is not None and stop(i, results[i]):
                            stopping = True
                    if stopping:
                        break
            finally:
                for f in pending:
                    f.cancel()
            return [r if r is not None else {"status": "skipped"} for r in results]

    def _outcome(self, f) -> dict:
        try:
            out = f.result()
        except CancelledError:
            return {"status": "skipped"}
        except TimeoutError:
            self.restarts += 1
            log.warning("%s: a task ran past %.1fs; its worker was replaced", self.label, self.timeout_s + self.grace_s)
            return {"status": "timeout", "hard": True}
        except pebble.ProcessExpired as e:
            self.restarts += 1
            log.warning("%s: a worker died (%s); replaced it", self.label, describe_exit(e.exitcode))
            return {"status": "error", "error": f"worker died ({describe_exit(e.exitcode)})"}
        except BaseException as e:  # noqa: BLE001 - e.g. an item that does not pickle
            return {"status": "error", "error": f"cannot run it in a worker: {_outcome_text(e)}"}
        if out["status"] == "start_error":
            raise WorkerStartError(f"{self.label}: workers fail to start: {out['error']}")
        return out

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.label}: workers={self.num_workers}, timeout_s={self.timeout_s})"


def _outcome_text(e: BaseException) -> str:
    if isinstance(e, BrokenProcessPool):
        return f"the worker pool broke ({_error_text(e)})"
    return _error_text(e)


__all__ = ["PoolClosed", "WorkerPool", "WorkerStartError", "describe_exit", "resolve"]
