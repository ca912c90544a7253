"""Answer verification with math-verify, and the worker pool that runs it.

math-verify's ``parse``/``verify`` guard themselves with ``signal.alarm``, which only works
on the main thread (environment pitfall 4), and some inputs hang inside C code where no
signal helps (``verify(parse("1"), parse("$10^{10^{10^{10}}}$"))`` computes a 10^10-digit
integer). So verification runs in persistent worker processes:

* each worker is a plain ``python -c`` subprocess (no multiprocessing: it does not re-import
  the trainer's ``__main__``/torch, does not fork a CUDA process, and works from any
  thread); it imports math-verify once, warms up, and reports "ready";
* requests/replies are JSON lines on the worker's stdin/stdout; one item per worker at a
  time, so the parent knows when each item started;
* soft timeout: the worker arms ``setitimer(ITIMER_REAL, timeout_s)`` around each item (it is
  the worker's main thread) with math-verify's own timeouts disabled (its ``alarm(0)`` would
  cancel ours); a Python-level hang is interrupted and reported as a timeout;
* hard timeout: an item still running ``timeout_s + grace`` after it was sent (a hang in C)
  gets its worker killed and replaced; the item counts as a timeout;
* a worker that dies mid-item is replaced and the item reported as an error.

``workers=0`` skips all this and verifies in-process with math-verify's timeouts disabled
(no timeout at all: for tests and debugging).
"""

from __future__ import annotations

import json
import logging
import os
import re
import selectors
import subprocess
import sys
import threading
import time
import weakref
from collections import deque
from typing import Any

from framework.errors import ConfigError, DataError

log = logging.getLogger(__name__)

_PKG_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_WRAP_RE = re.compile(r"\\(?:text|textbf|textit|textrm|mathrm|mathbf|boxed)\s*\{([^{}]*)\}")


# --------------------------------------------------------------------------- verification


def normalize_text(s: str) -> str:
    """Lowercase, collapse whitespace, drop surrounding ``$``, ``\\text{}``-like wrappers and
    trailing periods: ``" $\\text{Red}$. "`` -> ``"red"``."""
    t = str(s).strip()
    for _ in range(4):
        prev = t
        while len(t) >= 2 and t.startswith("$") and t.endswith("$"):
            t = t[1:-1].strip()
        t = _WRAP_RE.sub(r"\1", t).strip()
        t = t.rstrip(".").strip()
        if t == prev:
            break
    return " ".join(t.lower().split())


def _has_delimiters(s: str) -> bool:
    return s.count("$") >= 2 or "\\boxed" in s or "\\(" in s or "\\[" in s


def _looks_like_math(s: str) -> bool:
    """Bare LaTeX or a formula (no words): worth wrapping in ``$...$`` for the LaTeX parser.

    Text with words ("3 apples", "red") is left to math-verify's plain-expression parser,
    which would otherwise read "red" as the product r*e*d."""
    if "\\" in s:
        return True
    return re.search(r"[A-Za-z]{2,}", s) is None


def math_parse(s: str, timeout: int | None = None) -> list:
    """``math_verify.parse`` of an answer string (not a whole completion)."""
    from math_verify import parse

    s = s.strip()
    if not _has_delimiters(s) and _looks_like_math(s):
        s = f"${s}$"
    return parse(s, parsing_timeout=timeout)


def _is_parsed(parsed: list) -> bool:
    from sympy import Basic, MatrixBase

    return any(isinstance(x, (Basic, MatrixBase)) for x in parsed)


def verify_answer(pred: str, gold: str, timeout: int | None = None) -> dict[str, Any]:
    """Verify a predicted answer against a gold answer.

    Returns ``{"score": 0.0|1.0, "gold_ok": bool, "pred_ok": bool}``. Symbolic (math-verify)
    when both parse; normalised string equality when either does not. A gold answer that
    does not parse (``gold_ok`` False) is only ever matched by string equality.
    ``timeout``: math-verify's own signal timeouts (None disables them).
    """
    _quiet_math_verify()
    from math_verify import verify

    pred, gold = str(pred).strip(), str(gold).strip()
    if not gold:
        raise DataError("empty gold answer")
    string_eq = bool(pred) and normalize_text(pred) == normalize_text(gold)
    if not pred:
        return {"score": 0.0, "gold_ok": True, "pred_ok": False}
    gold_p = math_parse(gold, timeout)
    gold_ok = _is_parsed(gold_p)
    if not gold_ok:
        return {"score": float(string_eq), "gold_ok": False, "pred_ok": False}
    pred_p = math_parse(pred, timeout)
    pred_ok = _is_parsed(pred_p)
    if not pred_ok:
        return {"score": float(string_eq), "gold_ok": True, "pred_ok": False}
    ok = verify(gold_p, pred_p, timeout_seconds=timeout)
    return {"score": 1.0 if (ok or string_eq) else 0.0, "gold_ok": True, "pred_ok": True}


_QUIETED = False


def _quiet_math_verify() -> None:
    """Suppress math-verify's one-off "timeout disabled" warning: we time out ourselves."""
    global _QUIETED
    if _QUIETED:
        return
    import math_verify.grader as grader
    import math_verify.parser as parser

    for mod in (grader, parser):
        if hasattr(mod, "TIMEOUT_WARNING_SHOWN"):
            mod.TIMEOUT_WARNING_SHOWN = True
    _QUIETED = True


# --------------------------------------------------------------------------- worker side


class _SoftTimeout(BaseException):
    """Raised by SIGALRM in a worker; BaseException so math-verify's ``except Exception``
    cannot swallow it."""


def _handle(req: dict) -> dict:
    op = req.get("op", "verify")
    if op == "verify":
        return {"status": "ok", **verify_answer(req["pred"], req["gold"], None)}
    if op == "sleep":  # test hook: a Python-level hang (the soft timeout interrupts it)
        time.sleep(float(req["seconds"]))
        return {"status": "ok", "score": 1.0, "gold_ok": True}
    if op == "hang":  # test hook: a hang the soft timeout cannot interrupt
        import signal

        signal.signal(signal.SIGALRM, signal.SIG_IGN)
        time.sleep(float(req["seconds"]))
        return {"status": "ok", "score": 1.0, "gold_ok": True}
    if op == "raise":  # test hook
        raise RuntimeError(str(req.get("message", "boom")))
    raise ValueError(f"unknown op {op!r}")


def _worker_main() -> None:
    import signal

    proto = os.fdopen(os.dup(1), "w", buffering=1)  # replies go here ...
    os.dup2(2, 1)  # ... stray prints go to stderr
    sys.stdout = sys.stderr
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's business

    def on_alarm(signum, frame):
        raise _SoftTimeout()

    verify_answer("\\frac{1}{2}", "0.5")  # import + warm up (parser caches)
    signal.signal(signal.SIGALRM, on_alarm)
    proto.write('{"ready": true}\n')
    for line in sys.stdin:
        if not line.strip():
            continue
        rid = None
        try:
            req = json.loads(line)
            rid = req.get("id")
            timeout_s = float(req.get("timeout", 0) or 0)
            try:
                try:
                    signal.signal(signal.SIGALRM, on_alarm)
                    if timeout_s > 0:
                        signal.setitimer(signal.ITIMER_REAL, timeout_s)
                    res = _handle(req)
                finally:
                    signal.setitimer(signal.ITIMER_REAL, 0)
            except _SoftTimeout:
                res = {"status": "timeout"}
        except Exception as e:  # noqa: BLE001
            res = {"status": "error", "error": f"{type(e).__name__}: {e}"[:500]}
        res["id"] = rid
        proto.write(json.dumps(res) + "\n")


# --------------------------------------------------------------------------- parent side


class _Worker:
    def __init__(self, env: dict[str, str]):
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "from rewards.verify import _worker_main; _worker_main()"],
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
        self.spawned_at = time.monotonic()
        self.task: int | None = None  # index of the item being verified
        self.sent_at = 0.0

    def send(self, obj: dict) -> None:
        data = (json.dumps(obj) + "\n").encode()
        os.set_blocking(self.proc.stdin.fileno(), True)
        self.proc.stdin.write(data)
        self.proc.stdin.flush()

    def read_lines(self) -> list[dict] | None:
        """Complete reply lines available now; None at EOF (the worker died)."""
        out = []
        while True:
            try:
                chunk = os.read(self.fd, 65536)
            except BlockingIOError:
                break
            if not chunk:
                return out if out else None
            self.buf += chunk
        while b"\n" in self.buf:
            line, self.buf = self.buf.split(b"\n", 1)
            if line.strip():
                out.append(json.loads(line))
        return out

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


class VerifyPool:
    """Persistent verification workers with a per-item timeout. Thread-safe; lazy start.

    ``run(items)`` takes dicts ``{"pred": str, "gold": str}`` (or test ops) and returns one
    dict per item, in order, with ``status`` in ``ok | timeout | error`` (plus ``score`` and
    ``gold_ok`` for ``ok``, ``error`` for ``error``).
    """

    START_TIMEOUT_S = 120.0

    def __init__(self, workers: int = 4, timeout_s: float = 5.0, grace_s: float | None = None):
        if workers < 1:
            raise ConfigError(f"VerifyPool needs workers >= 1, got {workers}")
        if timeout_s <= 0:
            raise ConfigError(f"timeout_s must be > 0, got {timeout_s}")
        self.num_workers = int(workers)
        self.timeout_s = float(timeout_s)
        self.grace_s = float(grace_s) if grace_s is not None else min(2.0, max(0.5, timeout_s))
        self._workers: list[_Worker] = []
        self._procs: list[subprocess.Popen] = []
        self._lock = threading.Lock()
        self._closed = False
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
    def _spawn(self) -> _Worker:
        w = _Worker(self._env)
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
            raise RuntimeError("VerifyPool is closed")
        if self._workers:  # top up after an interrupted call; no need to wait
            while len(self._workers) < self.num_workers:
                self._spawn()
            return
        t0 = time.monotonic()
        for _ in range(self.num_workers):
            self._spawn()
        self._run_locked([])  # waits for ready
        if self.start_cost_s is None:
            self.start_cost_s = time.monotonic() - t0

    def close(self) -> None:
        with self._lock:
            self._closed = True
            procs = [w.proc for w in self._workers]
            self._workers.clear()
            self._procs.clear()
            _stop_procs(procs)
            self._finalizer.detach()

    # -- work
    def run(self, items: list[dict]) -> list[dict]:
        with self._lock:
            self._start_locked()
            return self._run_locked(items)

    def _run_locked(self, items: list[dict]) -> list[dict]:
        results: list[dict | None] = [None] * len(items)
        pending = deque(range(len(items)))
        start_failures = 0
        sel = selectors.DefaultSelector()
        try:
            for w in self._workers:
                sel.register(w.fd, selectors.EVENT_READ, w)
            n_done = 0
            while (n_done < len(items)) if items else not all(w.ready for w in self._workers):
                # dispatch
                for w in list(self._workers):
                    if w.ready and w.task is None and pending:
                        i = pending.popleft()
                        req = dict(items[i], id=i, timeout=self.timeout_s)
                        try:
                            w.send(req)
                        except (BrokenPipeError, OSError):
                            pending.appendleft(i)
                            sel.unregister(w.fd)
                            self._remove(w)
                            sel.register(self._spawn().fd, selectors.EVENT_READ, self._workers[-1])
                            self.restarts += 1
                            continue
                        w.task, w.sent_at = i, time.monotonic()
                # wait for replies or the next deadline
                now = time.monotonic()
                deadlines = []
                for w in self._workers:
                    if w.task is not None:
                        deadlines.append(w.sent_at + self.timeout_s + self.grace_s)
                    elif not w.ready:
                        deadlines.append(w.spawned_at + self.START_TIMEOUT_S)
                wait = max(0.0, min(deadlines) - now) if deadlines else 0.05
                for key, _ in sel.select(timeout=min(wait, 1.0)):
                    w: _Worker = key.data
                    if w not in self._workers:
                        continue
                    lines = w.read_lines()
                    for msg in lines or []:
                        if msg.get("ready"):
                            w.ready = True
                            start_failures = 0
                            continue
                        i = msg.get("id")
                        if w.task is not None and i == w.task:
                            results[i] = msg
                            n_done += 1
                            w.task = None
                    if lines is None:  # EOF: the worker died
                        rc = w.proc.poll()
                        sel.unregister(w.fd)
                        if w.task is not None:
                            results[w.task] = {"status": "error", "error": f"verify worker died (exit code {rc})"}
                            n_done += 1
                        elif not w.ready:
                            start_failures += 1
                            if start_failures >= 3:
                                raise RuntimeError(
                                    f"math-verify workers fail to start (exit code {rc}); see their stderr above"
                                )
                        self._remove(w, kill=False)
                        nw = self._spawn()
                        sel.register(nw.fd, selectors.EVENT_READ, nw)
                        self.restarts += 1
                # hard timeouts
                now = time.monotonic()
                for w in list(self._workers):
                    hung = w.task is not None and now > w.sent_at + self.timeout_s + self.grace_s
                    stuck = not w.ready and now > w.spawned_at + self.START_TIMEOUT_S
                    if stuck:
                        raise RuntimeError(f"a math-verify worker did not start in {self.START_TIMEOUT_S:.0f}s")
                    if hung:
                        results[w.task] = {"status": "timeout", "hard": True}
                        n_done += 1
                        sel.unregister(w.fd)
                        self._remove(w)
                        nw = self._spawn()
                        sel.register(nw.fd, selectors.EVENT_READ, nw)
                        self.restarts += 1
                        log.warning("math-verify worker hung past %.1fs; replaced it", self.timeout_s + self.grace_s)
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
        return f"VerifyPool(workers={self.num_workers}, timeout_s={self.timeout_s}, running={len(self._workers)})"
