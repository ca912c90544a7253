"""Worker processes with a per-item time limit, on pebble's ``ProcessPool``: the pool behind
math-verify (:class:`rewards.verify.VerifyPool`) and isolated reward plugins
(:mod:`rewards.isolated`).

pebble (https://github.com/noxdafox/pebble) runs the processes: it kills a worker whose task
runs past its time limit and replaces it, reports a worker that dies mid-task (segfault,
``os._exit``) as ``ProcessExpired`` with its exit code, and replaces it. Chosen over
``concurrent.futures.ProcessPoolExecutor``, which can neither stop a task that hangs nor lose a
worker without breaking the whole pool (``BrokenProcessPool`` for every pending task); their
raw cost per task measured the same (benchmarks/RESULTS.md, "Reward isolation on pebble"). What
this module adds:

* workers are started with ``spawn`` (a fresh interpreter: no fork of a CUDA process or of the
  trainer's threads); each builds its *handler* once in pebble's initializer, from a factory
  named ``"module:qualname"``, so imports and a plugin's constructor are not timed as a task. A
  factory that fails is reported by every task (``WorkerStartError``: the caller stops);
* items go to the workers a few at a time (:meth:`WorkerPool.chunk_size`: about four tasks per
  worker), so that the cost of a task (messages through pebble's threads) is shared; each item
  still has its own time limit and its own result, and a worker appends a byte to a progress
  file after each item, so the parent knows which item a lost worker was running;
* soft timeout: each item arms ``setitimer(ITIMER_REAL, timeout_s)`` in its worker; a
  Python-level hang is interrupted and reported as a timeout, and the worker goes on;
* hard timeout: an item still running ``timeout_s + grace_s`` after it started (a hang in C, a
  plugin swallowing the interrupt) has its worker killed (the task cancelled: pebble kills
  and replaces the worker); that item is a timeout, the other items of its task run again;
* a worker that dies mid-item (segfault, ``os._exit``) is replaced; that item is an error
  naming the exit code or signal, the other items of its task run again;
* bounds: each worker is the leader of its own session and process group, and the group dies
  with it (pebble's SIGTERM kills the group; a tiny reaper process, told by the kernel when the
  worker dies however it dies, kills what is left), so a plugin's children never outlive its
  worker; an address-space limit (``RLIMIT_AS``) on top of the worker's size at start; the
  output of a task (stdout and stderr, to a temporary file) is returned with its result, capped;
* the parent's ``__main__`` is imported in each worker (``spawn``'s rule, as for any
  multiprocessing pool): a script that scores isolated rewards guards its entry point with
  ``if __name__ == "__main__":``.
"""

from __future__ import annotations

import ctypes
import fcntl
import importlib
import inspect
import logging
import math
import multiprocessing
import os
import re
import resource
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, wait
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


def worker_ref(cls: Any, what: str, hint: str) -> str:
    """``"module:qualname"`` by which a worker process imports the class ``cls`` (a reward or a
    tool plugin, named ``what`` in messages); a ConfigError ending with ``hint`` when it cannot."""
    mod, qual = getattr(cls, "__module__", None), getattr(cls, "__qualname__", None)
    if not inspect.isclass(cls) or not mod or not qual:
        raise ConfigError(f"{what} is registered as {cls!r}, not a class; a worker cannot build it: {hint}")
    if "<locals>" in qual or mod == "__main__":
        where = "inside a function" if "<locals>" in qual else "in the __main__ script"
        raise ConfigError(
            f"{what} ({mod}.{qual}) cannot be imported by a worker process: it is defined {where}; {hint}"
        )
    try:
        found = resolve(f"{mod}:{qual}")
    except Exception as e:  # noqa: BLE001
        raise ConfigError(f"{what}: {mod}:{qual} does not import ({type(e).__name__}: {e}): {hint}") from e
    if found is not cls:
        raise ConfigError(f"{what}: {mod}:{qual} names another object than the registered class: {hint}")
    return f"{mod}:{qual}"


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
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
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


def _run_one(item: Any, timeout_s: float) -> dict:
    """One item in a worker: the handler under the soft timeout; always a dict."""
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
    return res


def _run_chunk(items: list, timeout_s: float, max_output: int, progress: str) -> dict:
    """One task: a few items, one after the other, each under its own soft timeout. A byte
    appended to the file ``progress`` after each item tells the parent how far the task got
    (the item running when a worker hangs in C or dies is known)."""
    if "start_error" in _WORKER:
        return {"start_error": _WORKER["start_error"]}
    fd = os.open(progress, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        results = []
        for item in items:
            results.append(_run_one(item, timeout_s))
            os.write(fd, b".")
    finally:
        os.close(fd)
    return {"results": results, "output": _take_output(max_output)}


# --------------------------------------------------------------------------- parent side


class WorkerPool:
    """Persistent workers running a handler with a per-item time limit. Thread-safe (one call
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
    def chunk_size(self, n: int) -> int:
        """Items per task for a call of ``n``: about four tasks per worker (the cost of a task,
        a few messages between processes, is shared by its items), at most 32."""
        return max(1, min(32, math.ceil(n / (4 * self.num_workers))))

    def run(self, items: Sequence[Any], stop: Callable[[int, dict], bool] | None = None) -> list[dict]:
        """One dict per item (see the class doc). ``stop(i, result)``, called on each result,
        may end the call early: the items not done by then are cancelled (a running task has
        its worker replaced) and get ``{"status": "skipped"}``."""
        with self._lock, tempfile.TemporaryDirectory(prefix="apo-rl-pool-") as tmp:
            call = _Call(self, self._ensure_pool(), items, tmp, stop)
            size = self.chunk_size(len(items))
            for s in range(0, len(items), size):
                call.submit(list(range(s, min(len(items), s + size))))
            try:
                while call.tasks and not call.stopping:
                    if self._closed:
                        raise PoolClosed(f"{self.label}: the worker pool was closed during a call")
                    done, _ = wait(list(call.tasks), timeout=0.1, return_when=FIRST_COMPLETED)
                    for f in sorted(done, key=lambda f: call.tasks[f].indices[0]):
                        call.finish(f)
                    call.watch()
            finally:
                for f in call.tasks:
                    f.cancel()
            return [r if r is not None else {"status": "skipped"} for r in call.results]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.label}: workers={self.num_workers}, timeout_s={self.timeout_s})"


class _Chunk:
    def __init__(self, indices: list[int], path: str, attempt: int):
        self.indices, self.path, self.attempt = indices, path, attempt
        self.started: float | None = None  # when first seen running
        self.progress = 0  # items done, as the worker reported them
        self.last = 0.0  # when progress last moved (or the task started)

    def read_progress(self) -> int:
        try:
            return os.stat(self.path).st_size
        except FileNotFoundError:
            return 0


class _Call:
    """The tasks of one :meth:`WorkerPool.run`: submitted in chunks, watched for hangs (no
    progress for ``timeout_s + grace_s``: the worker is killed), and a chunk whose worker was
    lost resubmitted without the item that was running."""

    MAX_ATTEMPTS = 3

    def __init__(self, owner: WorkerPool, pool, items, tmp: str, stop):
        self.owner, self.pool, self.items, self.tmp, self.stop = owner, pool, items, tmp, stop
        self.results: list[dict | None] = [None] * len(items)
        self.tasks: dict[Any, _Chunk] = {}
        self.stopping = False
        self._seq = 0

    def submit(self, indices: list[int], attempt: int = 0) -> None:
        if not indices:
            return
        self._seq += 1
        chunk = _Chunk(indices, os.path.join(self.tmp, str(self._seq)), attempt)
        o = self.owner
        f = self.pool.schedule(
            _run_chunk,
            args=([self.items[i] for i in indices], o.timeout_s, o.max_output_bytes or 0, chunk.path),
            timeout=len(indices) * o.timeout_s + o.grace_s + 5.0,  # a backstop: watch() acts first
        )
        self.tasks[f] = chunk

    def done(self, i: int, result: dict) -> None:
        self.results[i] = result
        if self.stop is not None and not self.stopping and self.stop(i, result):
            self.stopping = True

    def finish(self, f) -> None:
        chunk = self.tasks.pop(f, None)
        if chunk is None or f.cancelled():
            return
        try:
            out = f.result()
        except TimeoutError:
            self._lost(chunk, {"status": "timeout", "hard": True}, "a task hung")
            return
        except pebble.ProcessExpired as e:
            how = describe_exit(e.exitcode)
            self._lost(chunk, {"status": "error", "error": f"worker died ({how})"}, f"a worker died ({how})")
            return
        except BaseException as e:  # noqa: BLE001 - e.g. an item that does not pickle
            for i in chunk.indices:
                self.done(i, {"status": "error", "error": f"cannot run it in a worker: {_outcome_text(e)}"})
            return
        if "start_error" in out:
            raise WorkerStartError(f"{self.owner.label}: workers fail to start: {out['start_error']}")
        if out["output"] is not None:
            out["results"][0]["output"] = out["output"]
        for i, res in zip(chunk.indices, out["results"]):
            self.done(i, res)

    def watch(self) -> None:
        """Kill the worker of a task whose item has run ``timeout_s + grace_s`` (a hang the
        soft timeout could not interrupt)."""
        now = time.monotonic()
        limit = self.owner.timeout_s + self.owner.grace_s
        for f, chunk in list(self.tasks.items()):
            if not f.running():
                continue
            if chunk.started is None:
                chunk.started = chunk.last = now
            progress = chunk.read_progress()
            if progress != chunk.progress:
                chunk.progress, chunk.last = progress, now
            elif now - chunk.last > limit:
                f.cancel()  # pebble kills and replaces its worker
                del self.tasks[f]
                self._lost(chunk, {"status": "timeout", "hard": True}, f"a task ran past {limit:.1f}s")

    def _lost(self, chunk: _Chunk, culprit: dict, what: str) -> None:
        """The worker of ``chunk`` was killed or died: the item it was running gets ``culprit``;
        the others (done ones too: their results went with the worker) run again."""
        self.owner.restarts += 1
        log.warning("%s: %s; its worker was replaced", self.owner.label, what)
        k = min(chunk.read_progress(), len(chunk.indices) - 1)
        again = chunk.indices[:k] + chunk.indices[k + 1 :]
        self.done(chunk.indices[k], culprit)
        if chunk.attempt + 1 >= self.MAX_ATTEMPTS:
            for i in again:
                self.done(i, {"status": "error", "error": f"its worker was lost {self.MAX_ATTEMPTS} times"})
        elif not self.stopping:
            self.submit(again, chunk.attempt + 1)


def _outcome_text(e: BaseException) -> str:
    if isinstance(e, BrokenProcessPool):
        return f"the worker pool broke ({_error_text(e)})"
    return _error_text(e)


__all__ = ["PoolClosed", "WorkerPool", "WorkerStartError", "describe_exit", "resolve"]
