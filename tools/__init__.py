"""Tool plugins for multi-turn rollouts (registered in ``framework.registry.TOOLS``).

Built-in tools: ``crop`` and ``zoom`` (:mod:`tools.image`) and ``calculator``
(:mod:`tools.calculator`). :mod:`tools.format` parses Qwen2.5-style ``<tool_call>`` blocks and
renders results with :data:`tools.format.TOOL_CHAT_TEMPLATE`; :class:`tools.runner.ToolRunner`
runs a turn's calls under a time limit and counts what goes wrong; the ``tools`` config
section is :class:`tools.config.ToolsConfig`.
"""

from . import calculator, image  # noqa: F401  (registration)
from .base import Tool, ToolArgumentError, ToolContext, ToolResult, build_tool, validate_arguments
from .calculator import CalculatorTool, evaluate
from .image import CropTool, ZoomTool, resize_options

__all__ = [
    "CalculatorTool",
    "CropTool",
    "Tool",
    "ToolArgumentError",
    "ToolContext",
    "ToolResult",
    "ZoomTool",
    "build_tool",
    "evaluate",
    "resize_options",
    "validate_arguments",
]
