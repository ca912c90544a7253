"""Schedules of a scalar (the KL weight beta, the learning rate) over optimizer steps s in [0, T].

Each schedule is a pure function ``f(step, total_steps, **params) -> float``; ``SCHEDULES``
maps a name to ``(function, parameter names)``; ``make_schedule(cfg)`` binds the parameters
and returns ``callable(step, total_steps) -> float``. Progress s/T is clamped to [0, 1];
T <= 0 counts as progress 0. Add a schedule with ``register_schedule``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


def _progress(step: float, total_steps: float) -> float:
    if total_steps <= 0:
        return 0.0
    return min(max(float(step) / float(total_steps), 0.0), 1.0)


def constant(step: float, total_steps: float, *, value: float) -> float:
    """beta(s) = value."""
    return float(value)


def linear(step: float, total_steps: float, *, start: float, end: float) -> float:
    """beta(s) = start + (end - start) * s / T."""
    return start + (end - start) * _progress(step, total_steps)


def cosine(step: float, total_steps: float, *, start: float, end: float) -> float:
    """beta(s) = end + (start - end) * (1 + cos(pi * s / T)) / 2   (start at s=0, end at s=T)."""
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * _progress(step, total_steps)))


def grpo_d(step: float, total_steps: float, *, beta_min: float, beta_max: float, explore_frac: float = 0.3) -> float:
    """GRPO-D dynamic KL (OThink-MR1). w = explore_frac * T, beta_mid = (beta_min + beta_max)/2:

        beta(s) = beta_mid - (beta_mid - beta_min) * s / w               s <= w
        beta(s) = beta_min + (beta_max - beta_min) * (s - w) / (T - w)   w < s <= T

    Continuous at s = w (both sides give beta_min). Computed on progress s/T so T need not be
    an integer multiple of anything; explore_frac 0 or 1 degenerate to one branch.
    """
    p = _progress(step, total_steps)
    mid = 0.5 * (beta_min + beta_max)
    if p <= explore_frac:
        return mid if explore_frac <= 0 else mid - (mid - beta_min) * p / explore_frac
    return beta_min + (beta_max - beta_min) * (p - explore_frac) / (1.0 - explore_frac)


@dataclass(frozen=True)
class ScheduleSpec:
    fn: Callable[..., float]
    params: tuple[str, ...]
    # max over s of the schedule, from its parameters (used for needs_reference)
    peak: Callable[..., float]


SCHEDULES: dict[str, ScheduleSpec] = {
    "constant": ScheduleSpec(constant, ("value",), lambda value: value),
    "linear": ScheduleSpec(linear, ("start", "end"), lambda start, end: max(start, end)),
    "cosine": ScheduleSpec(cosine, ("start", "end"), lambda start, end: max(start, end)),
    "grpo_d": ScheduleSpec(
        grpo_d,
        ("beta_min", "beta_max", "explore_frac"),
        lambda beta_min, beta_max, explore_frac: max(beta_min, beta_max),
    ),
}


def register_schedule(name: str, fn: Callable[..., float], params: tuple[str, ...], peak: Callable[..., float]) -> None:
    SCHEDULES[name] = ScheduleSpec(fn, tuple(params), peak)


def _params(cfg: Any, name: str, coef: float | None) -> dict[str, float]:
    """Pick the schedule's parameters from a config object (attributes or mapping).
    ``value`` of constant and a missing (None) ``start``/``end`` default to ``coef``."""
    spec = SCHEDULES[name]
    get = cfg.get if isinstance(cfg, dict) else (lambda k, d=None: getattr(cfg, k, d))
    out = {}
    for p in spec.params:
        v = coef if p == "value" else get(p, None)
        if v is None and p in ("start", "end", "value"):
            v = coef
        if v is None:
            raise ValueError(f"schedule '{name}' needs parameter '{p}'")
        out[p] = float(v)
    return out


def make_schedule(cfg: Any, coef: float | None = None) -> Callable[[float, float], float]:
    """cfg: object or dict with ``name`` and the schedule's parameters (see ``SCHEDULES``).
    Returns ``f(step, total_steps) -> float``."""
    name = cfg["name"] if isinstance(cfg, dict) else cfg.name
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; allowed: {sorted(SCHEDULES)}")
    spec, params = SCHEDULES[name], _params(cfg, name, coef)

    def schedule(step: float, total_steps: float) -> float:
        return spec.fn(step, total_steps, **params)

    schedule.peak = spec.peak(**params)  # type: ignore[attr-defined]
    schedule.params = params  # type: ignore[attr-defined]
    return schedule


def schedule_peak(cfg: Any, coef: float | None = None) -> float:
    """Largest value the schedule takes over s in [0, T]."""
    return make_schedule(cfg, coef).peak  # type: ignore[attr-defined]


def lr_multiplier(name: str, total_steps: int, warmup_steps: int, min_ratio: float) -> Callable[[int], float]:
    """Multiplier of the base learning rate at optimizer step s (for ``LambdaLR``): linear
    warm-up (s + 1) / W over the first W = ``warmup_steps`` steps, then schedule ``name`` over
    the remaining T - W steps from 1 to ``min_ratio``:

        constant: 1;  linear: 1 + (min_ratio - 1) * p;  cosine: min_ratio + (1 - min_ratio) * (1 + cos(pi p)) / 2

    with p = (s - W) / max(1, T - W) clamped to [0, 1]."""
    if name == "constant":
        after = make_schedule({"name": "constant"}, coef=1.0)
    else:
        after = make_schedule({"name": name, "start": 1.0, "end": float(min_ratio)})

    def f(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        return after(step - warmup_steps, max(1, total_steps - warmup_steps))

    return f
