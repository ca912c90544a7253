"""The reward section of the run's config, typed: :class:`RewardConfig` (``reward.*``) and
:class:`IsolationConfig` (``reward.isolation.*``, and a component's ``isolate: {...}``).

Their defaults are the only defaults: registered as the ``base`` option of the ``reward``
group (``configs/reward/*.yaml`` start with ``defaults: [base, _self_]`` and state only what
they change), read by :meth:`rewards.RewardSet.from_config` through :func:`parse`, which
checks every key and value and names the key in a one-line :class:`ConfigError`.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Optional

from framework.errors import ConfigError
from framework.overrides import unknown_key_error


@dataclass
class IsolationConfig:
    """How a plugin that is not one of the project's built-ins runs: in worker processes."""

    timeout_s: float = 10.0  # per plugin call (one completion; a batch-aware plugin's batch): past it, 0 and a timeout
    workers: int = 2  # worker processes per isolated plugin
    # completions per plugin call. null: 1 for a plugin that scores one completion (`score`), the
    # whole batch for a batch-aware plugin (one that overrides `__call__`, e.g. a group-relative reward)
    batch_size: Optional[int] = None
    start_timeout_s: float = 120.0  # a worker's start (imports, the plugin's constructor)
    # address space a worker may add to its size at start (RLIMIT_AS; the plugin's imports,
    # constructor and scoring); an allocation past it fails: that completion scores 0 (a failure)
    memory_limit_mb: int = 4096
    max_output_kb: int = 64  # plugin stdout/stderr forwarded per call; the rest dropped with a note

    def validate(self, where: str) -> None:
        for key in ("timeout_s", "start_timeout_s"):
            v = getattr(self, key)
            if not v > 0 or not math.isfinite(v):
                raise ConfigError(f"{where}.{key} must be > 0, got {v!r}")
        for key in ("workers", "memory_limit_mb", "max_output_kb"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{where}.{key} must be >= 1, got {getattr(self, key)!r}")
        if self.batch_size is not None and self.batch_size < 1:
            raise ConfigError(f"{where}.batch_size must be >= 1 or null (automatic), got {self.batch_size!r}")


@dataclass
class ComponentConfig:
    """One entry of ``reward.components``: ``{weight, isolate, **params}``."""

    weight: float = 1.0  # its weight in the total reward
    # null: isolated unless a built-in (rewards.is_builtin); true / false; or a mapping of
    # IsolationConfig keys (over reward.isolation): isolated with these settings
    isolate: Any = None
    params: dict[str, Any] = field(default_factory=dict)  # the rest: the plugin's constructor parameters


def parse_component(name: str, value: Any) -> ComponentConfig:
    """``reward.components.<name>`` (a mapping or null) as a :class:`ComponentConfig`."""
    where = f"reward.components.{name}"
    if value is None:
        value = {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where}: expected a mapping {{weight, ...}}, got {value!r}")
    own = {"weight", "isolate"}
    comp = ComponentConfig(params={str(k): v for k, v in value.items() if k not in own})
    if "weight" in value:
        comp.weight = _convert(float, value["weight"], f"{where}.weight", None)
        if not math.isfinite(comp.weight):
            raise ConfigError(f"{where}.weight must be finite, got {comp.weight}")
    if "isolate" in value:
        comp.isolate = value["isolate"]
    return comp


@dataclass
class RewardConfig:
    """The reward plugins and how they are combined (see :class:`rewards.RewardSet`)."""

    # {registered name: {weight, isolate, **the plugin's parameters}}; total = sum(weight * score)
    components: dict[str, Any] = field(default_factory=dict)
    correctness: str = "accuracy"  # the plugin whose score >= 1 makes a completion correct (c_i)
    max_failure_frac: float = 0.5  # a plugin failing on more of one batch stops the run (1: never)
    max_stat_keys: int = 32  # extra counters logged per plugin; more are dropped (reported once)
    isolation: IsolationConfig = field(default_factory=IsolationConfig)

    def validate(self, where: str) -> None:
        if not isinstance(self.components, Mapping) or not self.components:
            raise ConfigError(f"{where}.components must be a non-empty mapping {{reward_name: {{weight, ...}}}}")
        if not self.correctness:
            raise ConfigError(f"{where}.correctness must name a reward plugin")
        if not 0.0 <= self.max_failure_frac <= 1.0:
            raise ConfigError(
                f"{where}.max_failure_frac must be in [0, 1] (1 never stops the run), got {self.max_failure_frac!r}"
            )
        if self.max_stat_keys < 0:
            raise ConfigError(f"{where}.max_stat_keys must be >= 0, got {self.max_stat_keys!r}")
        self.isolation.validate(f"{where}.isolation")


_T = typing.TypeVar("_T")


def parse(schema: type[_T], value: Any, where: str, base: _T | None = None) -> _T:
    """``value`` (a mapping) as a ``schema`` dataclass over ``base`` (default: the schema's
    defaults), each key and value checked, then ``validate(where)``; a ConfigError names the key."""
    if isinstance(value, schema):
        value = dataclasses.asdict(value)
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where} must be a mapping of {_names(schema)}, got {value!r}")
    names = _names(schema)
    unknown = sorted(str(k) for k in value if k not in names)
    if unknown:
        raise unknown_key_error(f"{where}.{unknown[0]}", names, where)
    out = dataclasses.replace(base) if base is not None else schema()
    hints = typing.get_type_hints(schema)
    for key, v in value.items():
        setattr(out, key, _convert(hints[key], v, f"{where}.{key}", getattr(out, key)))
    out.validate(where)
    return out


def _names(schema: type) -> list[str]:
    return [f.name for f in dataclasses.fields(schema)]


def _convert(tp: Any, v: Any, key: str, current: Any) -> Any:
    args = typing.get_args(tp)
    if typing.get_origin(tp) is typing.Union:  # Optional[X]
        if v is None:
            return None
        tp = next(a for a in args if a is not type(None))
    if dataclasses.is_dataclass(tp):
        return parse(tp, v, key, current if v is not None else None)
    if tp is float:
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or v != v:
            raise ConfigError(f"{key} must be a number, got {v!r}")
        return float(v)
    if tp is int:
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or v != v or float(v) != int(v):
            raise ConfigError(f"{key} must be an integer, got {v!r}")
        return int(v)
    if tp is str:
        if not isinstance(v, str):
            raise ConfigError(f"{key} must be a string, got {v!r}")
        return v
    if typing.get_origin(tp) is dict:
        if not isinstance(v, Mapping):
            raise ConfigError(f"{key} must be a mapping, got {v!r}")
        return dict(v)
    raise TypeError(f"no conversion for {tp!r} ({key})")  # a schema field of a type not handled here


def total_weights(section: Mapping[str, Any]) -> dict[str, float]:
    """``{plugin: weight}`` of the total reward as :class:`rewards.RewardSet` builds it from the
    reward section ``section`` (the correctness plugin with weight 0 when it is not a
    component), without building any plugin: for reports of a run's stored config."""
    cfg = parse(RewardConfig, section, "reward")
    weights = {str(k): parse_component(str(k), v).weight for k, v in cfg.components.items()}
    weights.setdefault(cfg.correctness, 0.0)
    return weights


def isolation_fields() -> list[str]:
    return _names(IsolationConfig)


__all__ = [
    "ComponentConfig",
    "IsolationConfig",
    "RewardConfig",
    "isolation_fields",
    "parse",
    "parse_component",
    "total_weights",
]
