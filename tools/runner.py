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
dict``), which also checks the result, so that a worker never sends 50 MB back. With
``isolate: true`` (the default) it runs in :class:`rewards.pool.WorkerPool`, the reward plugins'
pool (pebble, ``spawn``ed workers, each building the tools once from their classes'
``"module:qualname"``): a soft time limit interrupts a call at ``timeout_s``, a worker still busy
after a grace period, or one that dies (segfault, ``os._exit``), is replaced, its children
killed with it, and an address-space limit bounds each worker. With ``isolate: false``,
:class:`InProcessBackend` serves the calls in this process, in waves of ``workers`` daemon
threads; a call past ``timeout_s`` is answered with a timeout and its thread abandoned (a thread
cannot be killed: a tool that never returns keeps it and, if it spins, a share of the GIL;
``tools/abandoned_threads``), and a crash of the process is not contained: for tests and
trusted tools only.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from framework.errors import ConfigError
from framework.registry import TOOLS

from .base import Tool, ToolContext, ToolResult, _accepted_params, build_tool
from .config import ToolsConfig
from .format import ToolCall, ToolCallError, parse_tool_calls, tool_message, tool_turn_text
from .image import resize_options

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
    ToolResult}`` (checked by :func:`check_result`). An exception of the tool is ``{"status":
    "error", "error": message}``. Built once per worker (or once, in process) from ``{"cfg":
    ToolsConfig, "tools": {name: ("module:qualname", params)}}``, or with ready ``tools``."""

    def __init__(self, init: Mapping[str, Any], tools: Mapping[str, Tool] | None = None):
        self.cfg: ToolsConfig = init["cfg"]
        if tools is None:
            from rewards.pool import resolve

            tools = {n: build_tool(n, params, cls=resolve(ref)) for n, (ref, params) in init["tools"].items()}
        self.tools = dict(tools)

    def __call__(self, item: Mapping[str, Any]) -> dict:
        try:
            res = self.tools[item["name"]](item["arguments"], item["context"])
        except Exception as e:  # noqa: BLE001 - a tool's bug is an error result, never the run's end
            return {"status": "error", "error": f"{type(e).__name__}: {e}"[:_MAX_ERROR_CHARS]}
        return {"status": "ok", "result": check_result(res, self.cfg)}


def tool_ref(cls: type, name: str) -> str:
    """``"module:qualname"`` by which a worker process imports the tool class ``cls``; a
    ConfigError saying what to do when it cannot."""
    from rewards.pool import worker_ref

    hint = (
        "define it at module level in an importable module (named in plugins=[...] or an entry point), "
        "or set tools.isolate=false to run the tools in the trainer process"
    )
    return worker_ref(cls, f"tool '{name}'", hint)


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

    ``classes``: ``{name: Tool subclass}`` to use instead of the registry (tests); every name
    is then offered. ``image_processor``: the model's (Qwen2-VL-style) image processor; its grid
    and pixel bounds (:func:`tools.image.resize_options`) become the default ``factor``,
    ``min_pixels``, ``max_pixels`` of every tool that takes them, so crops come back at a
    resolution that processor accepts unchanged. Use :meth:`schemas` for the chat template's ``tools=``, :meth:`run_turn`
    once per turn, :meth:`close` at the end. With ``cfg.isolate`` the workers start on
    :meth:`start` or the first call that runs a tool."""

    def __init__(
        self,
        cfg: ToolsConfig,
        classes: Mapping[str, type] | None = None,
        *,
        image_processor: Any = None,
    ):
        cfg.validate()
        self.cfg = cfg
        if classes is None:
            classes = {n: TOOLS.get(n) for n in cfg.enabled}
        params = {n: dict((cfg.params or {}).get(n) or {}) for n in classes}
        if image_processor is not None:
            # the model's processor grid and pixel bounds, for every tool whose constructor takes
            # them (crop, zoom, plugins with the same parameters); tools.params.<name> overrides
            grid = resize_options(image_processor)
            for n, c in classes.items():
                accepted = _accepted_params(c)
                if accepted is not None:  # a **kwargs constructor gets only what the config names
                    params[n] = {**{k: v for k, v in grid.items() if k in accepted}, **params[n]}
        self.params = params
        # built here too: parameters checked before any worker starts, schemas for the prompt
        self.tools: dict[str, Tool] = {n: build_tool(n, params.get(n), cls=c) for n, c in classes.items()}
        self.parameters = {n: t.parameters for n, t in self.tools.items()}
        self.backend: Any
        if cfg.isolate:
            from rewards.pool import WorkerPool

            init = {"cfg": cfg, "tools": {n: (tool_ref(c, n), params.get(n)) for n, c in classes.items()}}
            self.backend = WorkerPool(
                "tools.runner:ToolHandler",
                init,
                workers=cfg.workers,
                timeout_s=cfg.timeout_s,
                start_timeout_s=cfg.start_timeout_s,
                memory_limit_mb=cfg.memory_limit_mb,
                label="tools",
            )
        else:
            self.backend = InProcessBackend(
                ToolHandler({"cfg": cfg}, tools=self.tools), workers=cfg.workers, timeout_s=cfg.timeout_s
            )
        self.stats: dict[str, dict[str, int]] = defaultdict(lambda: dict.fromkeys(("calls", *STATUSES[1:]), 0))

    def start(self) -> None:
        """Start the worker processes now (a tool that does not build there is a ConfigError
        here, before any model loads); nothing to do in process."""
        if self.cfg.isolate:
            from rewards.pool import WorkerStartError

            try:
                self.backend.start()
            except WorkerStartError as e:
                raise ConfigError(f"tools cannot run in a worker process: {e}") from e

    # -- what the model is told
    def allowed(self, record: Mapping[str, Any] | None) -> list[str]:
        """The enabled tools a record allows: ``record["metadata"][cfg.record_key]`` when it is
        a list (names not enabled in this run are left out), else every enabled tool."""
        meta = (record or {}).get("metadata") or {}
        own = meta.get(self.cfg.record_key) if isinstance(meta, Mapping) else None
        if own is None:
            return list(self.tools)
        own = {own} if isinstance(own, str) else set(own)  # one name, or a list of names
        return [n for n in self.tools if n in own]

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
            for (t, slot, call), out in zip(pending, self._run(items)):
                outcomes[t].results[slot] = self._result(call.name, out)
        for o in outcomes:
            for name, res in zip(o.names, o.results):
                self._count(name, res)
        return outcomes

    def _run(self, items: list[dict]) -> list[dict]:
        if not self.cfg.isolate:
            return self.backend.run(items)
        from rewards.pool import WorkerStartError

        try:
            return self.backend.run(items)
        except WorkerStartError as e:  # the tools cannot be built at all: a setup error, not a tool error
            raise ConfigError(f"tools cannot run in a worker process: {e}") from e

    def _result(self, name: str, out: Mapping[str, Any]) -> ToolResult:
        status = out.get("status")
        if status == "ok":
            return out["result"]
        if status == "timeout":
            return ToolResult.fail(f"'{name}' did not answer within {self.cfg.timeout_s:g}s", status="timeout")
        if status == "skipped":  # not run (the pool stopped early); not expected without a stop rule
            return ToolResult.fail(f"'{name}' was not run", status="crash")
        return ToolResult.fail(f"'{name}' failed: {out.get('error', status)}", status="crash")

    def _count(self, name: str | None, res: ToolResult) -> None:
        s = self.stats[name if name in self.tools else "(invalid)"]  # one bucket for unknown and unparsable names
        s["calls"] += 1
        if res.status != "ok":
            s[res.status] += 1

    def metrics(self, prefix: str = "tools/") -> dict[str, float]:
        """The counters as flat metrics: ``tools/<tool>/<calls|error|timeout|...>``, and
        ``tools/abandoned_threads`` (in process), ``tools/worker_restarts`` (isolated)."""
        m = {f"{prefix}{n}/{k}": float(v) for n, s in sorted(self.stats.items()) for k, v in s.items()}
        m[f"{prefix}abandoned_threads"] = float(getattr(self.backend, "abandoned", 0))
        m[f"{prefix}worker_restarts"] = float(getattr(self.backend, "restarts", 0))
        return m

    def close(self) -> None:
        self.backend.close()
        for t in self.tools.values():
            try:
                t.close()
            except Exception:  # noqa: BLE001 - closing must not hide the run's own outcome
                log.exception("tool '%s': close() failed", t.name)


__all__ = ["InProcessBackend", "ToolBudget", "ToolHandler", "ToolRunner", "TurnOutcome", "check_result", "tool_ref"]
