"""Persistent worker processes with a per-call time limit: the one pool behind math-verify
(:class:`rewards.verify.VerifyPool`) and isolated reward plugins (:mod:`rewards.isolated`).

* each worker is a plain ``python -c`` subprocess of the same interpreter (no
  multiprocessing: it does not re-import the trainer's ``__main__``/torch, does not fork a
  CUDA process, and works from any thread). Its first input is an init frame naming a
  *handler factory* (``"module:qualname"``), its argument and the parent's ``sys.path``; the
  worker imports the factory, builds the handler (imports, warm-up) and reports "ready", or
  reports the error and exits (:class:`WorkerStartError` in the parent, no retry);
* requests are length-prefixed pickle frames on the worker's stdin (the parent's own data:
  records may hold images), replies are JSON lines on its stdout (only numbers and strings
  come back: nothing a plugin returns is unpickled in the parent); stray prints go to
  stderr; one request per worker at a time, so the parent knows when each one started;
* objects shared by many requests of one call (the record of a group of G completions) are
  sent to a worker once per call: an item names them by index in ``refs`` and the handler
  finds them in ``req["shared"]``;
* soft timeout: the worker arms ``setitimer(ITIMER_REAL, timeout_s)`` around each request
  (it is the worker's main thread); a Python-level hang is interrupted and reported as a
  timeout, and the worker goes on;
* hard timeout: a request still running ``timeout_s + grace`` after it was sent (a hang in C,
  a plugin swallowing the interrupt) gets its worker killed and replaced; it counts as a
  timeout;
* a worker that dies mid-request (segfault, ``os._exit``) is replaced and the request reported
  as an error naming the exit code or signal; ``SystemExit``/``KeyboardInterrupt`` raised by
  the handler are reported as an error, then the worker exits and is replaced.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import pickle
import selectors
import signal
import struct
import subprocess
import sys
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from framework.errors import ConfigError

log = logging.getLogger(__name__)

_PKG_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_HEADER = struct.Struct("<Q")
_MAX_ERROR_CHARS = 500


class WorkerStartError(RuntimeError):
    """Workers that cannot start (their handler fails to import or to build, or they die
    before they are ready)."""


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


# --------------------------------------------------------------------------- worker side


class _SoftTimeout(BaseException):
    """Raised by SIGALRM in a worker; BaseException so ``except Exception`` in a handler
    (math-verify, a plugin) cannot swallow it."""


def _read_frame(stream) -> Any:
    head = stream.read(_HEADER.size)
    if len(head) < _HEADER.size:
        return None
    (n,) = _HEADER.unpack(head)
    data = stream.read(n)
    if len(data) < n:
        return None
    return pickle.loads(data)


def _error_text(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"[:_MAX_ERROR_CHARS]


def _worker_main() -> None:
    proto = os.fdopen(os.dup(1), "w", buffering=1)  # replies go here ...
    os.dup2(2, 1)  # ... stray prints go to stderr
    sys.stdout = sys.stderr
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's business
    stdin = sys.stdin.buffer

    def reply(obj: dict) -> None:
        try:
            text = json.dumps(obj)
        except (TypeError, ValueError) as e:
            text = json.dumps({"id": obj.get("id"), "status": "error", "error": f"unencodable reply: {e}"})
        proto.write(text + "\n")

    def on_alarm(signum, frame):
        raise _SoftTimeout()

    try:
        init = _read_frame(stdin)
        if init is None:
            return
        extra = [p for p in init.get("sys_path") or [] if p not in sys.path]
        sys.path[:0] = extra
        handle = resolve(init["handler"])(init.get("init"))
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which stops
        reply({"ready": False, "error": _error_text(e)})
        proto.flush()
        os._exit(1)
    signal.signal(signal.SIGALRM, on_alarm)
    reply({"ready": True})
    shared: dict[int, Any] = {}
    call = None
    while True:
        try:
            req = _read_frame(stdin)
        except Exception as e:  # noqa: BLE001 - a broken frame: say so and stop
            reply({"id": None, "status": "error", "error": f"unreadable request: {_error_text(e)}"})
            break
        if req is None:  # EOF: the parent closed our stdin
            break
        rid = req.get("id")
        if req.get("call") != call:
            shared.clear()
            call = req.get("call")
        try:
            for k, blob in (req.pop("attach", None) or {}).items():
                shared[k] = pickle.loads(blob)
        except Exception as e:  # noqa: BLE001 - e.g. a record whose class does not import here
            reply({"id": rid, "status": "error", "error": f"cannot read the request: {_error_text(e)}"})
            continue
        req["shared"] = shared
        timeout_s = float(req.get("timeout", 0) or 0)
        leave = False
        try:
            try:
                signal.signal(signal.SIGALRM, on_alarm)
                if timeout_s > 0:
                    signal.setitimer(signal.ITIMER_REAL, timeout_s)
                res = handle(req)
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
        except _SoftTimeout:
            res = {"status": "timeout"}
        except Exception as e:  # noqa: BLE001
            res = {"status": "error", "error": _error_text(e)}
        except BaseException as e:  # noqa: BLE001 - SystemExit & co: report, then leave
            res = {"status": "error", "error": _error_text(e) + " (raised in a worker, which is restarted)"}
            leave = True
        if not isinstance(res, dict):
            res = {"status": "error", "error": f"handler returned {type(res).__name__}, not a dict"}
        res["id"] = rid
        if leave:
            res["leaving"] = True  # the parent replaces this worker instead of sending it more
        reply(res)
        if leave:
            proto.flush()
            os._exit(0)


# --------------------------------------------------------------------------- parent side


class _Worker:
    def __init__(self, env: dict[str, str], init: dict):
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "from rewards.workers import _worker_main; _worker_main()"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            bufsize=0,
            env=env,
            cwd=_PKG_PARENT,
        )
        self.fd = self.proc.stdout.fileno()
        os.set_blocking(self.fd, False)
        self.buf = b""
        self.ready = False
        self.start_error: str | None = None
        self.leaving = False  # said it exits after its reply (SystemExit in the handler)
        self.spawned_at = time.monotonic()
        self.task: int | None = None  # index of the item being run
        self.sent_at = 0.0
        self.sent_refs: set[int] = set()  # shared objects this worker holds for the current call
        self.call = None
        try:
            self.send(init)
        except (BrokenPipeError, OSError):
            pass  # died at once: seen as EOF

    def send(self, obj: Any) -> None:
        self.send_frame(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))

    def send_frame(self, data: bytes) -> None:
        os.set_blocking(self.proc.stdin.fileno(), True)
        self.proc.stdin.write(_HEADER.pack(len(data)) + data)
        self.proc.stdin.flush()

    def read_lines(self) -> tuple[list[dict], bool]:
        """Complete reply lines available now, and whether the pipe is at EOF (the worker
        exited). Lines written just before the exit come with the EOF: they are kept (a
        worker that replies, then leaves, is not a worker that died mid-request)."""
        out = []
        eof = False
        while True:
            try:
                chunk = os.read(self.fd, 65536)
            except BlockingIOError:
                break
            if not chunk:
                eof = True
                break
            self.buf += chunk
        while b"\n" in self.buf:
            line, self.buf = self.buf.split(b"\n", 1)
            if line.strip():
                try:
                    msg = json.loads(line)
                except ValueError:
                    msg = None
                out.append(msg if isinstance(msg, dict) else {"garbled": line[:200].decode("utf-8", "replace")})
        return out, eof

    def kill(self) -> None:
        _stop_procs([self.proc], grace_s=0.0)


def _stop_procs(procs: list[subprocess.Popen], grace_s: float = 1.0) -> None:
    for p in procs:
        try:
            p.stdin.close()  # a healthy worker exits at EOF
        except Exception:  # noqa: BLE001
            pass
    deadline = time.monotonic() + grace_s
    for p in procs:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
        except Exception:  # noqa: BLE001
            pass
        try:
            p.stdout.close()
        except Exception:  # noqa: BLE001
            pass


def _finalize(procs: list[subprocess.Popen], owner_pid: int) -> None:
    if os.getpid() == owner_pid:  # not in a forked child
        _stop_procs(list(procs))


class WorkerPool:
    """Persistent workers running ``handler`` with a per-request timeout. Thread-safe (one
    call at a time); the workers start on the first :meth:`run` (or :meth:`start`).

    ``handler``: ``"module:qualname"`` of a factory ``f(init) -> handle``, run in each worker,
    where ``handle(req: dict) -> dict`` serves one request (``req`` is the item plus ``id``,
    ``timeout`` and ``shared``) and returns a JSON-encodable dict. ``run(items, shared)``
    returns one dict per item, in order, with ``status`` in ``ok | timeout | error``
    (``error`` then holds the message; a hard timeout also has ``hard: True``).
    """

    START_TIMEOUT_S = 120.0

    def __init__(
        self,
        handler: str,
        init: Any = None,
        *,
        workers: int = 4,
        timeout_s: float = 5.0,
        grace_s: float | None = None,
        label: str = "worker",
        start_timeout_s: float | None = None,
    ):
        if workers < 1:
            raise ConfigError(f"{label}: a worker pool needs workers >= 1, got {workers}")
        if not timeout_s > 0:
            raise ConfigError(f"{label}: timeout_s must be > 0, got {timeout_s}")
        self.handler, self.init, self.label = handler, init, label
        self.num_workers = int(workers)
        self.timeout_s = float(timeout_s)
        self.grace_s = float(grace_s) if grace_s is not None else min(2.0, max(0.5, timeout_s))
        self.start_timeout_s = float(start_timeout_s or self.START_TIMEOUT_S)
        self._workers: list[_Worker] = []
        self._procs: list[subprocess.Popen] = []
        self._lock = threading.Lock()
        self._closed = False
        self._call = 0
        self.restarts = 0
        self.start_cost_s: float | None = None  # first start: spawn until all ready
        self._env = dict(os.environ)
        self._env["PYTHONPATH"] = os.pathsep.join(
            [_PKG_PARENT] + [p for p in self._env.get("PYTHONPATH", "").split(os.pathsep) if p]
        )
        for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            self._env.setdefault(k, "1")
        self._finalizer = weakref.finalize(self, _finalize, self._procs, os.getpid())

    # -- lifecycle
    def _init_frame(self) -> dict:
        sys_path = [os.getcwd() if p == "" else p for p in sys.path]
        return {"handler": self.handler, "init": self.init, "sys_path": sys_path}

    def _spawn(self) -> _Worker:
        w = _Worker(self._env, self._init_frame())
        self._workers.append(w)
        self._procs.append(w.proc)
        return w

    def _remove(self, w: _Worker, kill: bool = True) -> None:
        if kill:
            w.kill()
        else:
            _stop_procs([w.proc], grace_s=0.0)
        self._workers.remove(w)
        if w.proc in self._procs:
            self._procs.remove(w.proc)

    def start(self) -> None:
        """Start the workers now and wait until they are ready (else: on first ``run``)."""
        with self._lock:
            self._start_locked()

    def _start_locked(self) -> None:
        if self._closed:
            raise PoolClosed(f"{self.label}: the worker pool is closed")
        if self._workers:  # top up after an interrupted call; no need to wait
            while len(self._workers) < self.num_workers:
                self._spawn()
            return
        t0 = time.monotonic()
        for _ in range(self.num_workers):
            self._spawn()
        self._run_locked([], None)  # waits for ready
        if self.start_cost_s is None:
            self.start_cost_s = time.monotonic() - t0

    def close(self) -> None:
        """Stop the workers; a call in progress on another thread stops within a second
        (:class:`PoolClosed`). Safe to call more than once."""
        self._closed = True
        with self._lock:
            procs = [w.proc for w in self._workers]
            self._workers.clear()
            self._procs.clear()
            _stop_procs(procs)
            self._finalizer.detach()

    @property
    def closed(self) -> bool:
        return self._closed

    # -- work
    def run(
        self,
        items: list[dict],
        shared: Sequence[Any] | None = None,
        stop: Callable[[int, dict], bool] | None = None,
    ) -> list[dict]:
        """One dict per item (see the class doc). ``shared``: objects items name by index in
        their ``refs``. ``stop(i, result)``, called on each result, may end the call early: the
        items not done by then get ``{"status": "skipped"}`` (busy workers are replaced)."""
        with self._lock:
            self._start_locked()
            return self._run_locked(items, shared, stop)

    def _replace(self, w: _Worker, sel: selectors.BaseSelector, kill: bool = True) -> None:
        sel.unregister(w.fd)
        self._remove(w, kill=kill)
        nw = self._spawn()
        sel.register(nw.fd, selectors.EVENT_READ, nw)
        self.restarts += 1

    def _request(
        self, w: _Worker, i: int, item: dict, shared: Sequence[Any] | None, blobs: dict
    ) -> tuple[bytes, list[int]]:
        """The frame of item ``i`` for worker ``w``, with the shared objects it lacks (each
        pickled once per call, whatever the number of workers)."""
        req = dict(item, id=i, timeout=self.timeout_s, call=self._call)
        if w.call != self._call:
            w.call, w.sent_refs = self._call, set()
        need = [k for k in item.get("refs") or () if k not in w.sent_refs]
        for k in need:
            if k not in blobs:
                blobs[k] = pickle.dumps(shared[k], protocol=pickle.HIGHEST_PROTOCOL)  # type: ignore[index]
        if need:
            req["attach"] = {k: blobs[k] for k in need}
        return pickle.dumps(req, protocol=pickle.HIGHEST_PROTOCOL), need

    def _run_locked(
        self, items: list[dict], shared: Sequence[Any] | None, stop: Callable[[int, dict], bool] | None = None
    ) -> list[dict]:
        self._call += 1
        results: list[dict | None] = [None] * len(items)
        # contiguous blocks of items per worker slot (the G completions of a group share a record:
        # it then goes to one worker, not to all); a worker whose block is done takes from the
        # end of the longest other block
        n_slots = max(1, self.num_workers)
        queues = [deque() for _ in range(n_slots)]
        for i in range(len(items)):
            queues[i * n_slots // len(items)].append(i)
        start_failures = 0
        n_done = 0
        stopping = False
        blobs: dict[int, bytes] = {}

        def done(i: int, msg: dict) -> None:
            nonlocal n_done, stopping
            results[i] = msg
            n_done += 1
            if stop is not None and not stopping and stop(i, msg):
                stopping = True

        sel = selectors.DefaultSelector()
        try:
            for w in self._workers:
                sel.register(w.fd, selectors.EVENT_READ, w)
            while (n_done < len(items)) if items else not all(w.ready for w in self._workers):
                if stopping:
                    for w in list(self._workers):
                        if w.task is not None:  # its reply would be stale in the next call
                            sel.unregister(w.fd)
                            self._remove(w)
                    for i, r in enumerate(results):
                        if r is None:
                            results[i] = {"status": "skipped"}
                    break
                if self._closed:
                    raise PoolClosed(f"{self.label}: the worker pool was closed during a call")
                # dispatch
                for slot, w in enumerate(list(self._workers)):
                    if w.ready and w.task is None and any(queues):
                        q = queues[slot % n_slots]
                        if q:
                            i = q.popleft()
                        else:
                            q = max(queues, key=len)
                            i = q.pop()
                        try:
                            frame, attached = self._request(w, i, items[i], shared, blobs)
                        except Exception as e:  # noqa: BLE001 - e.g. a record that does not pickle
                            done(i, {"status": "error", "error": f"cannot send it to a worker: {_error_text(e)}"})
                            continue
                        try:
                            w.send_frame(frame)
                        except (BrokenPipeError, OSError):
                            q.appendleft(i)
                            self._replace(w, sel)
                            continue
                        w.sent_refs.update(attached)
                        w.task, w.sent_at = i, time.monotonic()
                # wait for replies or the next deadline
                now = time.monotonic()
                deadlines = []
                for w in self._workers:
                    if w.task is not None:
                        deadlines.append(w.sent_at + self.timeout_s + self.grace_s)
                    elif not w.ready:
                        deadlines.append(w.spawned_at + self.start_timeout_s)
                wait = max(0.0, min(deadlines) - now) if deadlines else 0.05
                for key, _ in sel.select(timeout=min(wait, 1.0)):
                    w: _Worker = key.data
                    if w not in self._workers:
                        continue
                    lines, eof = w.read_lines()
                    garbled = None
                    for msg in lines:
                        if "garbled" in msg:
                            garbled = msg["garbled"]
                            continue
                        if "ready" in msg:
                            if msg["ready"]:
                                w.ready = True
                                start_failures = 0
                            else:
                                w.start_error = str(msg.get("error", "unknown error"))
                            continue
                        i = msg.get("id")
                        if msg.pop("leaving", False):
                            w.leaving = True
                        if w.task is not None and i == w.task:
                            w.task = None
                            done(i, msg)
                    if garbled is not None:  # not our protocol: the worker is not to be trusted
                        if w.task is not None:
                            i, w.task = w.task, None
                            done(i, {"status": "error", "error": f"garbled reply from a worker: {garbled!r}"})
                        self._replace(w, sel)
                        continue
                    if w.leaving and w.task is None:  # it exits after its reply: replace it now
                        self._replace(w, sel, kill=False)
                        continue
                    if eof:  # the worker died
                        rc = w.proc.poll()
                        if rc is None:
                            try:
                                rc = w.proc.wait(timeout=1.0)
                            except subprocess.TimeoutExpired:
                                pass
                        if w.start_error is not None:
                            raise WorkerStartError(f"{self.label}: workers fail to start: {w.start_error}")
                        if w.task is not None:
                            i, w.task = w.task, None
                            done(i, {"status": "error", "error": f"worker died ({describe_exit(rc)})"})
                            log.warning("%s: a worker died (%s); replaced it", self.label, describe_exit(rc))
                        elif not w.ready:
                            start_failures += 1
                            if start_failures >= 3:
                                raise WorkerStartError(
                                    f"{self.label}: workers fail to start ({describe_exit(rc)}); see their stderr above"
                                )
                        self._replace(w, sel, kill=False)
                # hard timeouts
                now = time.monotonic()
                for w in list(self._workers):
                    hung = w.task is not None and now > w.sent_at + self.timeout_s + self.grace_s
                    stuck = not w.ready and now > w.spawned_at + self.start_timeout_s
                    if stuck:
                        raise WorkerStartError(f"{self.label}: a worker did not start in {self.start_timeout_s:.0f}s")
                    if hung:
                        i, w.task = w.task, None
                        done(i, {"status": "timeout", "hard": True})
                        self._replace(w, sel)
                        log.warning(
                            "%s: a worker hung past %.1fs; replaced it", self.label, self.timeout_s + self.grace_s
                        )
        except BaseException:
            # leave no worker mid-item: the next call must not read stale replies
            for w in list(self._workers):
                if w.task is not None or not w.ready:
                    self._remove(w)
            raise
        finally:
            sel.close()
        return results  # type: ignore[return-value]

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.label}: workers={self.num_workers}, timeout_s={self.timeout_s}, "
            f"running={len(self._workers)})"
        )


Handler = Callable[[dict], dict]
