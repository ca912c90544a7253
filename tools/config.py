"""The ``tools`` section of a run's config, typed: :class:`ToolsConfig`.

Not registered in ``framework/config.py`` yet (multi-turn generation, which reads it, comes
next); :meth:`ToolsConfig.validate` names the key of a bad value in a one-line ConfigError.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from framework.errors import ConfigError


@dataclass
class ToolsConfig:
    """Which tools a run offers the model and the limits of their calls."""

    enabled: list[str] = field(default_factory=list)  # registered tool names offered to the model; [] = no tools
    params: dict[str, Any] = field(default_factory=dict)  # {tool name: {its constructor parameters}}
    max_calls: int = 4  # per trajectory, over all turns; a call past it is answered with an error (status 'limit')
    max_calls_per_turn: int = 2  # per assistant turn; the rest of the turn's calls are answered with an error
    timeout_s: float = 5.0  # per call: past it the call is an error result (status 'timeout')
    isolate: bool = True  # run the tools in worker processes (see tools.runner: in-process until rewards.pool lands)
    workers: int = 2  # worker processes (or threads, in process) running calls in parallel
    start_timeout_s: float = 120.0  # a worker's start (imports, the tools' constructors)
    memory_limit_mb: int = 2048  # address space a worker may add to its size at start
    max_result_chars: int = (
        2000  # text of one result; a longer one is cut to this and is an error (status 'bad_result')
    )
    max_result_images: int = 2  # images of one result; more is an error (status 'bad_result')
    max_image_pixels: int = 4096 * 4096  # pixels of one returned image; a larger one is an error (status 'bad_result')
    record_key: str = (
        "tools"  # record["metadata"][record_key], when present: the subset of `enabled` that record allows
    )

    def validate(self, where: str = "tools") -> None:
        if not isinstance(self.enabled, (list, tuple)) or not all(isinstance(n, str) and n for n in self.enabled):
            raise ConfigError(f"{where}.enabled must be a list of tool names, got {self.enabled!r}")
        if len(set(self.enabled)) != len(self.enabled):
            raise ConfigError(f"{where}.enabled names a tool twice: {list(self.enabled)}")
        if not isinstance(self.params, dict):
            raise ConfigError(f"{where}.params must be a mapping {{tool name: {{parameters}}}}, got {self.params!r}")
        for name, p in self.params.items():
            if name not in self.enabled:
                raise ConfigError(
                    f"{where}.params.{name}: '{name}' is not in {where}.enabled ({', '.join(self.enabled) or 'empty'})"
                )
            if p is not None and not isinstance(p, dict):
                raise ConfigError(f"{where}.params.{name} must be a mapping of parameters, got {p!r}")
        for key in ("timeout_s", "start_timeout_s"):
            v = getattr(self, key)
            if not isinstance(v, (int, float)) or not v > 0 or not math.isfinite(v):
                raise ConfigError(f"{where}.{key} must be a finite number > 0, got {v!r}")
        for key in ("max_calls_per_turn", "workers", "memory_limit_mb", "max_result_chars", "max_image_pixels"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 1:
                raise ConfigError(f"{where}.{key} must be an integer >= 1, got {getattr(self, key)!r}")
        for key in ("max_calls", "max_result_images"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 0:
                raise ConfigError(f"{where}.{key} must be an integer >= 0, got {getattr(self, key)!r}")
        if not self.record_key:
            raise ConfigError(f"{where}.record_key must name a key of a record's metadata")


__all__ = ["ToolsConfig"]
