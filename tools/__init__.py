"""Tool plugins for multi-turn rollouts (registered in ``framework.registry.TOOLS``).

Built-in tools: ``crop`` and ``zoom`` (:mod:`tools.image`) and ``calculator``
(:mod:`tools.calculator`). :mod:`tools.format` parses Qwen2.5-style ``<tool_call>`` blocks and
renders results with :data:`tools.format.TOOL_CHAT_TEMPLATE`; :class:`tools.runner.ToolRunner`
runs a turn's calls in worker processes under a time limit and counts what goes wrong; the
``tools`` config section is :class:`tools.config.ToolsConfig`.
"""

from . import calculator, image  # noqa: F401  (registration)
from .base import Tool, ToolArgumentError, ToolContext, ToolResult, build_tool, validate_arguments
from .calculator import CalculatorTool, evaluate
from .config import ToolsConfig
from .format import TOOL_CHAT_TEMPLATE, ToolCall, ToolCallError, parse_tool_calls, tool_message, tool_turn_text
from .image import CropTool, ZoomTool, resize_options
from .runner import ToolBudget, ToolRunner, TurnOutcome

__all__ = [
    "TOOL_CHAT_TEMPLATE",
    "CalculatorTool",
    "CropTool",
    "Tool",
    "ToolArgumentError",
    "ToolBudget",
    "ToolCall",
    "ToolCallError",
    "ToolContext",
    "ToolResult",
    "ToolRunner",
    "ToolsConfig",
    "TurnOutcome",
    "ZoomTool",
    "build_tool",
    "evaluate",
    "parse_tool_calls",
    "resize_options",
    "tool_message",
    "tool_turn_text",
    "validate_arguments",
]
