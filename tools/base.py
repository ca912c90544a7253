"""Tool plugin base class, the call context, the result type and argument checks.

A tool is what the model calls in a multi-turn rollout: it takes JSON arguments and the
trajectory's context and returns text and/or images::

    @TOOLS.register("word_count")
    class WordCount(Tool):
        description = "Count the words of a text."
        parameters = {
            "type": "object",
            "properties": {"text": {"type": "string", "maxLength": 10000}},
            "required": ["text"],
        }

        def run(self, arguments: dict, context: ToolContext) -> ToolResult:
            return ToolResult(text=str(len(arguments["text"].split())))

Contract:

* ``name`` is the registered name (set by :func:`build_tool`); ``parameters`` is a JSON-schema
  object described to the model through the chat template's ``tools=`` argument
  (:meth:`Tool.schema`), and arguments are checked against it (:func:`validate_arguments`,
  the subset of JSON schema that tools use) before :meth:`Tool.run` is called;
* ``Tool.__call__(arguments, context) -> ToolResult`` never raises for bad arguments: a
  :class:`ToolArgumentError` raised by ``run`` (or a schema mismatch) becomes
  ``ToolResult(error=message)``, which the model reads as the tool's answer. Any other exception
  is a bug of the tool; :class:`tools.runner.ToolRunner` turns it into an error result too, and
  counts it;
* the constructor's keyword parameters come from the tool's config
  (``tools.params.<name>: {...}``), like a reward's.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from framework.errors import ConfigError
from framework.registry import TOOLS


class ToolArgumentError(ValueError):
    """Raised inside a tool for arguments it cannot serve; its message goes to the model."""


@dataclass
class ToolContext:
    """What a tool may read about the trajectory that calls it.

    ``record``: the data record of the trajectory (schema of :mod:`framework.data.schema`);
    ``images``: every image of the trajectory so far, as PIL images, in the order the model saw
    them (the prompt's images, then those returned by earlier tool calls); a tool's
    ``image_index`` indexes this list. ``turn``: the 0-based assistant turn that made the call.
    """

    record: dict = field(default_factory=dict)
    images: list = field(default_factory=list)
    turn: int = 0


@dataclass
class ToolResult:
    """What a tool returns: ``text`` and/or ``images`` (PIL images, shown to the model in the
    tool's response turn, in order), or an error: ``error`` holds the message and the model
    reads ``"Error: <message>"``. ``status`` says why a result is an error, for the counters:
    ``ok``, ``error`` (the tool refused its arguments), ``parse_error`` (the call itself was
    malformed), ``crash`` (the tool raised or returned garbage), ``timeout``, ``limit`` (over
    the per-trajectory call budget)."""

    text: str = ""
    images: list = field(default_factory=list)
    error: str | None = None
    status: str = "ok"

    @property
    def is_error(self) -> bool:
        return self.error is not None

    @classmethod
    def fail(cls, message: str, status: str = "error") -> ToolResult:
        return cls(error=str(message), status=status)

    def model_text(self) -> str:
        """The text the model reads for this result."""
        return f"Error: {self.error}" if self.error is not None else self.text


class Tool:
    """Base class of tool plugins (see the module doc)."""

    name: str = ""
    description: ClassVar[str] = ""
    parameters: ClassVar[dict] = {"type": "object", "properties": {}}

    def schema(self) -> dict:
        """The tool as the chat template's ``tools=`` expects it (OpenAI function format, what
        Qwen2.5's template renders with ``tojson`` inside ``<tools></tools>``)."""
        return {
            "type": "function",
            "function": {"name": self.name, "description": self.description, "parameters": self.parameters},
        }

    def run(self, arguments: dict, context: ToolContext) -> ToolResult:
        raise NotImplementedError(f"tool '{self.name}' implements neither run() nor __call__()")

    def __call__(self, arguments: dict, context: ToolContext) -> ToolResult:
        """``run`` on schema-checked arguments; a bad argument is an error result, not an exception."""
        problem = validate_arguments(arguments, self.parameters)
        if problem is not None:
            return ToolResult.fail(f"bad arguments for '{self.name}': {problem}")
        try:
            return self.run(dict(arguments), context)
        except ToolArgumentError as e:
            return ToolResult.fail(str(e))

    def close(self) -> None:
        """Release what the tool holds (nothing by default)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name})"


def build_tool(name: str, params: Mapping[str, Any] | None = None, cls: type | None = None) -> Tool:
    """The registered tool ``name`` (or the class ``cls``, named ``name``) built with ``params``;
    unknown parameters are refused with the accepted ones (a ConfigError naming
    ``tools.params.<name>``)."""
    if cls is None:
        cls = TOOLS.get(name)
    params = dict(params or {})
    accepted = _accepted_params(cls)
    if accepted is not None:
        unknown = sorted(k for k in params if k not in accepted)
        if unknown:
            raise ConfigError(
                f"tools.params.{name}.{unknown[0]}: unknown parameter of tool '{name}'; "
                f"accepted: {', '.join(sorted(accepted)) or '(none)'}"
            )
    try:
        tool = cls(**params)
    except ToolArgumentError as e:  # a constructor may validate its options with the same error
        raise ConfigError(f"tools.params.{name}: {e}") from e
    if not isinstance(tool, Tool):
        raise ConfigError(f"tool '{name}' is registered as {cls!r}, which does not build a tools.base.Tool")
    tool.name = name
    return tool


def _accepted_params(cls: type) -> set[str] | None:
    """Keyword parameters of ``cls.__init__``; None when it takes ``**kwargs``."""
    try:
        sig = inspect.signature(cls.__init__)
    except (TypeError, ValueError):
        return None
    names = set()
    for p in list(sig.parameters.values())[1:]:  # [1:]: self
        if p.kind is p.VAR_KEYWORD:
            return None
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
            names.add(p.name)
    return names


# --------------------------------------------------------------------------- argument checks


def _finite(v: Any) -> bool:
    """No NaN or infinity anywhere in ``v`` (JSON has none; Python's json module accepts them)."""
    if isinstance(v, float):
        return math.isfinite(v)
    if isinstance(v, dict):
        return all(_finite(x) for x in v.values())
    if isinstance(v, list):
        return all(_finite(x) for x in v)
    return True


def validate_arguments(value: Any, schema: Mapping[str, Any], path: str = "arguments") -> str | None:
    """The first way ``value`` breaks the JSON schema ``schema`` (jsonschema's best match, a
    message naming the path: ``arguments.bbox: [0, 0, 1] is too short``), or None."""
    from jsonschema import Draft202012Validator
    from jsonschema.exceptions import best_match

    if not _finite(value):
        return f"{path}: numbers must be finite (no NaN or Infinity)"
    err = best_match(Draft202012Validator(schema).iter_errors(value))
    if err is None:
        return None
    where = path + err.json_path[1:]  # "$.bbox[3]" -> "arguments.bbox[3]"
    return f"{where}: {err.message}"[:300]  # the model reads it: a 50 MB argument is not repeated back


__all__ = ["Tool", "ToolArgumentError", "ToolContext", "ToolResult", "build_tool", "validate_arguments"]
