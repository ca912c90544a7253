"""Running the tool calls of a turn: :class:`ToolRunner`.

The multi-turn loop hands the runner, for every active trajectory of a step, the completion of
its last turn, its :class:`ToolContext` and its :class:`ToolBudget`; :meth:`ToolRunner.run_turn`
parses every call (:func:`tools.format.parse_tool_calls`), answers the malformed ones and those
past the budget with an error, runs the rest of the whole batch in parallel, each under
``timeout_s``, checks what came back and returns one :class:`TurnOutcome` per trajectory: the
results in call order, the ``tool`` messages, the text to append after the model's
``<|im_end|>`` and the images it adds to the trajectory.

Whatever a tool does, the run goes on: an exception, a hang past ``timeout_s``, or a return
value that is not a :class:`ToolResult` of bounded size (text over ``max_result_chars``, more
than ``max_result_images`` images, an image over ``max_image_pixels``, a non-image in
``images``) becomes an error result (``status``: ``crash``, ``timeout``, ``bad_result``; text
capped), which the model reads as the tool's answer, and is counted in :attr:`ToolRunner.stats`
per tool.

Execution: every call goes through one handler, :class:`ToolHandler` (``item dict -> result
dict``: the protocol of :class:`rewards.pool.WorkerPool`, whose workers build the handler once
and serve items under a time limit). Until that pool is committed, :class:`InProcessBackend`
serves the items in this process, one daemon thread per call; a call past ``timeout_s`` is
answered with a timeout and its thread abandoned (it cannot be killed: a tool that never returns
keeps a thread and, if it spins, a share of the GIL; ``stats["abandoned_threads"]``). TODO(issue
25): run the handler in ``rewards.pool.WorkerPool`` when ``isolate`` is true.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .base import Tool, ToolContext, ToolResult, build_tool
from .config import ToolsConfig
from .format import ToolCall, ToolCallError, parse_tool_calls, tool_message, tool_turn_text

log = logging.getLogger(__name__)

_MAX_ERROR_CHARS = 300  # characters of an exception message shown to the model
STATUSES = ("ok", "error", "parse_error", "crash", "timeout", "bad_result", "limit")


@dataclass
class ToolBudget:
    """Calls a trajectory has made so far (against ``ToolsConfig.max_calls``); one per trajectory."""

    calls: int = 0


@dataclass
class TurnOutcome:
    """What one trajectory's turn produced: one result per call, in the order written."""

    results: list[ToolResult] = field(default_factory=list)
    names: list[str | None] = field(default_factory=list)  # the tool each call named (None: unparsable)

    @property
    def called(self) -> bool:
        """Whether the turn wrote any call (a turn without one ends the trajectory)."""
        return bool(self.results)

    def messages(self) -> list[dict]:
        return [tool_message(r, n) for r, n in zip(self.results, self.names)]

    def images(self) -> list:
        """The images this turn adds to the trajectory, in the order the template places them."""
        return [im for r in self.results for im in r.images]

    def text(self, chat_template: str | None = None) -> str:
        """The text that follows the model's ``<|im_end|>`` (:func:`tools.format.tool_turn_text`);
        empty for a turn without calls (it ends the trajectory)."""
        if not self.results:
            return ""
        if chat_template is None:
            return tool_turn_text(self.results)
        return tool_turn_text(self.results, chat_template)


def check_result(res: Any, cfg: ToolsConfig) -> ToolResult:
    """``res`` as a bounded ToolResult, or an error result (status ``bad_result``) saying what is
    wrong with it; the text of either is at most ``max_result_chars``."""
    from PIL import Image

    if not isinstance(res, ToolResult):
        return ToolResult.fail(f"the tool returned {type(res).__name__}, not a ToolResult", "bad_result")
    if not isinstance(res.text, str) or not (res.error is None or isinstance(res.error, str)):
        return ToolResult.fail("the tool returned text or an error that is not a string", "bad_result")
    if not isinstance(res.images, (list, tuple)):
        return ToolResult.fail(f"the tool returned images as {type(res.images).__name__}, not a list", "bad_result")
    if len(res.images) > cfg.max_result_images:
        return ToolResult.fail(
            f"the tool returned {len(res.images)} images; at most {cfg.max_result_images} (tools.max_result_images)",
            "bad_result",
        )
    for im in res.images:
        if not isinstance(im, Image.Image):
            return ToolResult.fail(
                f"the tool returned a {type(im).__name__} among its images, not an image", "bad_result"
            )
        if im.width * im.height > cfg.max_image_pixels or min(im.size) < 1:
            return ToolResult.fail(
                f"the tool returned a {im.width}x{im.height} image; at most {cfg.max_image_pixels} pixels "
                "(tools.max_image_pixels)",
                "bad_result",
            )
    n = cfg.max_result_chars
    if len(res.text) > n or (res.error is not None and len(res.error) > n):
        size = len(res.text) + len(res.error or "")
        # the first characters are kept as the error's text: the model sees what the tool began to say
        return ToolResult(
            text=(res.error or res.text)[:n],
            error=f"the tool returned {size} characters; at most {n} (tools.max_result_chars); the first {n} follow",
            status="bad_result",
        )
    status = res.status if res.status in STATUSES else "ok"
    if res.error is not None and status == "ok":
        status = "error"
    return ToolResult(text=res.text, images=list(res.images), error=res.error, status=status)


class ToolHandler:
    """Serves one call: ``{"name", "arguments", "context"}`` -> ``{"status": "ok", "result":
    ToolResult}`` (checked by :func:`check_result`, so a worker never sends 50 MB back). An
    exception of the tool is ``{"status": "error", "error": message}``. Built once per worker
    (or once, in process) from ``{"tools": {name: params}, "cfg": ToolsConfig}``."""

    def __init__(self, init: Mapping[str, Any], tools: Mapping[str, Tool] | None = None):
        self.cfg: ToolsConfig = init["cfg"]
        self.tools = dict(tools) if tools is not None else {n: build_tool(n, p) for n, p in init["tools"].items()}

    def __call__(self, item: Mapping[str, Any]) -> dict:
        try:
            res = self.tools[item["name"]](item["arguments"], item["context"])
        except Exception as e:  # noqa: BLE001 - a tool's bug is an error result, never the run's end
            return {"status": "error", "error": f"{type(e).__name__}: {e}"[:_MAX_ERROR_CHARS]}
        return {"status": "ok", "result": check_result(res, self.cfg)}


class InProcessBackend:
    """Runs items through a :class:`ToolHandler` in this process, in waves of ``workers``
    daemon threads, each call answered within ``timeout_s`` of its start (see the module doc).
    ``run(items) -> [result dict]`` like :meth:`rewards.pool.WorkerPool.run`: ``status`` in
    ``ok | timeout | error``."""

    def __init__(self, handler: ToolHandler, *, workers: int, timeout_s: float):
        self.handler, self.workers, self.timeout_s = handler, int(workers), float(timeout_s)
        self.abandoned = 0  # threads left running a call past its time limit

    def run(self, items: Sequence[Mapping[str, Any]]) -> list[dict]:
        out: list[dict | None] = [None] * len(items)
        late: set[int] = set()

        def serve(i: int, item: Mapping[str, Any]) -> None:
            try:
                out[i] = self.handler(item)
            except BaseException as e:  # noqa: BLE001 - SystemExit in a tool: reported, the thread ends
                out[i] = {"status": "error", "error": f"{type(e).__name__}: {e}"[:_MAX_ERROR_CHARS]}

        for lo in range(0, len(items), self.workers):
            wave = []
            for i in range(lo, min(len(items), lo + self.workers)):
                t = threading.Thread(target=serve, args=(i, items[i]), daemon=True, name=f"tool-call-{i}")
                t.start()
                wave.append((i, t, time.monotonic() + self.timeout_s))
            for i, t, deadline in wave:
                t.join(max(0.0, deadline - time.monotonic()))
                if t.is_alive():  # cannot be stopped: left running, its late answer ignored
                    self.abandoned += 1
                    late.add(i)
        # a thread past its deadline may still write out[i] later: its answer is the timeout regardless
        return [{"status": "timeout"} if i in late or r is None else r for i, r in enumerate(out)]

    def close(self) -> None:
        pass


class ToolRunner:
    """The tools of a run (``cfg.enabled``, built with ``cfg.params``) and their execution.

    ``tools``: ready tool objects instead of building them from the registry (tests). Use
    :meth:`schemas` for the chat template's ``tools=``, :meth:`run_turn` once per turn."""

    def __init__(self, cfg: ToolsConfig, tools: Mapping[str, Tool] | None = None):
        cfg.validate()
        self.cfg = cfg
        if tools is None:
            tools = {n: build_tool(n, (cfg.params or {}).get(n)) for n in cfg.enabled}
        else:
            tools = dict(tools)
            for n, t in tools.items():
                t.name = n
        self.tools: dict[str, Tool] = tools
        self.parameters = {n: t.parameters for n, t in tools.items()}
        self.handler = ToolHandler({"cfg": cfg, "tools": {}}, tools=tools)
        # TODO(issue 25): rewards.pool.WorkerPool("tools.runner:ToolHandler", ...) when cfg.isolate
        self.backend = InProcessBackend(self.handler, workers=cfg.workers, timeout_s=cfg.timeout_s)
        self.stats: dict[str, dict[str, int]] = defaultdict(lambda: dict.fromkeys(("calls", *STATUSES[1:]), 0))

    # -- what the model is told
    def allowed(self, record: Mapping[str, Any] | None) -> list[str]:
        """The enabled tools a record allows: ``record["metadata"][cfg.record_key]`` when it is
        a list (names not enabled in this run are left out), else every enabled tool."""
        meta = (record or {}).get("metadata") or {}
        own = meta.get(self.cfg.record_key) if isinstance(meta, Mapping) else None
        if own is None:
            return list(self.tools)
        return [n for n in self.tools if n in set(own)]

    def schemas(self, record: Mapping[str, Any] | None = None) -> list[dict]:
        """The chat template's ``tools=`` for a record (all enabled tools without one)."""
        return [self.tools[n].schema() for n in self.allowed(record)]

    # -- a turn
    def run_turn(
        self, completions: Sequence[str], contexts: Sequence[ToolContext], budgets: Sequence[ToolBudget]
    ) -> list[TurnOutcome]:
        """The tool calls of one turn of every trajectory (see the module doc). ``budgets`` are
        updated: every call written counts, malformed ones included."""
        if not len(completions) == len(contexts) == len(budgets):
            raise ValueError(f"{len(completions)} completions, {len(contexts)} contexts, {len(budgets)} budgets")
        outcomes = [TurnOutcome() for _ in completions]
        pending: list[tuple[int, int, ToolCall]] = []  # (trajectory, slot in its outcome, call)
        for t, (text, ctx, budget) in enumerate(zip(completions, contexts, budgets)):
            allowed = self.allowed(ctx.record)
            parsed = parse_tool_calls(text, {n: self.parameters[n] for n in allowed})
            for k, call in enumerate(parsed.calls):
                outcome = outcomes[t]
                outcome.names.append(call.name)
                budget.calls += 1
                if k >= self.cfg.max_calls_per_turn:
                    res = ToolResult.fail(
                        f"not run: at most {self.cfg.max_calls_per_turn} tool calls per turn", status="limit"
                    )
                elif budget.calls > self.cfg.max_calls:
                    res = ToolResult.fail(
                        f"not run: this conversation has used its {self.cfg.max_calls} tool calls; answer now",
                        status="limit",
                    )
                elif isinstance(call, ToolCallError):
                    res = call.result()
                else:
                    res = None  # runs below, with the rest of the batch
                    pending.append((t, len(outcome.results), call))
                outcome.results.append(res)
        if pending:
            items = [{"name": c.name, "arguments": c.arguments, "context": contexts[t]} for t, _, c in pending]
            for (t, slot, call), out in zip(pending, self.backend.run(items)):
                outcomes[t].results[slot] = self._result(call.name, out)
        for o in outcomes:
            for name, res in zip(o.names, o.results):
                self._count(name, res)
        return outcomes

    def _result(self, name: str, out: Mapping[str, Any]) -> ToolResult:
        status = out.get("status")
        if status == "ok":
            return out["result"]
        if status == "timeout":
            return ToolResult.fail(f"'{name}' did not answer within {self.cfg.timeout_s:g}s", status="timeout")
        return ToolResult.fail(f"'{name}' failed: {out.get('error', status)}", status="crash")

    def _count(self, name: str | None, res: ToolResult) -> None:
        s = self.stats[name if name in self.tools else "(invalid)"]  # one bucket for unknown and unparsable names
        s["calls"] += 1
        if res.status != "ok":
            s[res.status] += 1

    def metrics(self, prefix: str = "tools/") -> dict[str, float]:
        """The counters as flat metrics: ``tools/<tool>/<calls|error|timeout|...>``, and
        ``tools/abandoned_threads``."""
        m = {f"{prefix}{n}/{k}": float(v) for n, s in sorted(self.stats.items()) for k, v in s.items()}
        m[f"{prefix}abandoned_threads"] = float(getattr(self.backend, "abandoned", 0))
        return m

    def close(self) -> None:
        self.backend.close()
        for t in self.tools.values():
            try:
                t.close()
            except Exception:  # noqa: BLE001 - closing must not hide the run's own outcome
                log.exception("tool '%s': close() failed", t.name)


__all__ = ["InProcessBackend", "ToolBudget", "ToolHandler", "ToolRunner", "TurnOutcome", "check_result"]
