"""Answer verification with math-verify, and the worker pool that runs it.

math-verify's ``parse``/``verify`` guard themselves with ``signal.alarm``, which only works
on the main thread (environment pitfall 4), and some inputs hang inside C code where no
signal helps (``verify(parse("1"), parse("$10^{10^{10^{10}}}$"))`` computes a 10^10-digit
integer). So verification runs in persistent worker processes, :class:`VerifyPool`: the
:class:`rewards.pool.WorkerPool` (pebble's process pool, also behind isolated reward plugins)
running :func:`_handle`, with math-verify's own timeouts disabled (its ``alarm(0)`` would
cancel the worker's timer):

* each worker imports math-verify once and warms up before it takes an item;
* soft timeout: a Python-level hang is interrupted by the worker's ``setitimer`` and reported
  as a timeout;
* hard timeout: an item still running ``timeout_s + grace`` after it started (a hang in C)
  gets its worker killed and replaced; the item counts as a timeout;
* a worker that dies mid-item is replaced and the item reported as an error.

``workers=0`` skips all this and verifies in-process with math-verify's timeouts disabled
(no timeout at all: for tests and debugging).
"""

from __future__ import annotations

import logging
import re
import time
from typing import Any

from framework.errors import ConfigError, DataError

from .pool import WorkerPool

log = logging.getLogger(__name__)

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


def _handle(req: dict) -> dict:
    if "op" not in req:  # {"pred", "gold"}
        return {"status": "ok", **verify_answer(req["pred"], req["gold"], None)}
    op = req["op"]
    if op == "sleep":  # test hook: a Python-level hang (the soft timeout interrupts it)
        time.sleep(float(req["seconds"]))
        return {"status": "ok", "score": 1.0, "gold_ok": True}
    if op == "hang":  # test hook: a hang the soft timeout cannot interrupt
        import signal

        signal.signal(signal.SIGALRM, signal.SIG_IGN)
        time.sleep(float(req["seconds"]))
        return {"status": "ok", "score": 1.0, "gold_ok": True}
    if op == "raise":  # test hook
        raise RuntimeError(str(req["message"]))
    raise ValueError(f"unknown op {op!r}")


def _verify_handler(init: Any = None):
    """Worker-side factory: import math-verify and warm up its parser caches once."""
    verify_answer("\\frac{1}{2}", "0.5")
    return _handle


# --------------------------------------------------------------------------- parent side


class VerifyPool(WorkerPool):
    """Persistent math-verify workers with a per-item timeout (:class:`rewards.pool.WorkerPool`
    running :func:`_handle`). Thread-safe; lazy start.

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
        super().__init__(
            "rewards.verify:_verify_handler",
            None,
            workers=workers,
            timeout_s=timeout_s,
            start_timeout_s=self.START_TIMEOUT_S,
            grace_s=grace_s,
            label="math-verify",
        )

    def __repr__(self) -> str:
        return f"VerifyPool(workers={self.num_workers}, timeout_s={self.timeout_s})"
