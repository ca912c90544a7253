"""The papers' recipes, and where a composed run config departs from them.

:data:`RECIPES` is the one place the framework keeps each algorithm's published recipe (keyed
by ``algorithm.name``); :func:`recipe_differences` lists the keys of a run config that differ
from it, one readable line per key, e.g. ``"optim.betas=[0.9, 0.999] (APO recipe: [0.9, 0.95])"``.
The trainer prints them at start-up, so a run that is not the paper's recipe says so.

Only the values that define the method are listed (algorithm, sampling, optimizer, reward),
as ../shared/specs/algorithms.md states them; the scale of a run (model, batch, lengths,
number of steps, devices) is the hardware's business and is not compared. The full published
runs, scale included, are the experiment configs (configs/experiment/, e.g.
``experiment=view_r1_3b``); their tests check them against the sources independently of this
table.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, OmegaConf


@dataclass(frozen=True)
class Recipe:
    label: str  # how the start-up line names it: "APO recipe differs in: ..."
    source: str
    values: dict[str, Any] = field(default_factory=dict)  # dotted run-config key -> paper's value


RECIPES: dict[str, Recipe] = {
    # APO's reference recipe (spec "APO = GRPO + DADS + STCR"; View-R1 paper and release)
    "apo": Recipe(
        label="APO",
        source="View-R1 (arXiv 2506.21655) and the authors' release",
        values={
            "algorithm.kl.estimator": "k3",
            "algorithm.kl.coef": 1e-3,
            "algorithm.kl.schedule.name": "constant",
            "algorithm.clip_low": 0.2,
            "algorithm.clip_high": 0.2,
            "rollout.group_size": 8,
            "rollout.temperature": 1.0,
            "optim.lr": 1e-6,
            "optim.scheduler": "cosine",
            "optim.min_lr_ratio": 0.1,  # cosine to 1e-7
            "optim.warmup_ratio": 0.03,
            "optim.betas": [0.9, 0.95],
            "optim.grad_clip": 1.0,
            "reward.components.accuracy.weight": 1.0,
            "reward.components.format.weight": 0.5,
        },
    ),
    # GRPO-D (OThink-MR1, arXiv 2503.16081): its beta bounds depend on the task (counting
    # 0.04/0.10, geometry 0.0/0.02), so only the exploration fraction is compared
    "grpo_d": Recipe(
        label="GRPO-D",
        source="OThink-MR1 (arXiv 2503.16081), other parameters following R1-V",
        values={
            "algorithm.kl.estimator": "k3",
            "algorithm.kl.schedule.name": "grpo_d",
            "algorithm.kl.schedule.explore_frac": 0.3,
            "algorithm.loss_agg": "seq_mean_token_mean",
            "rollout.group_size": 8,
            "rollout.temperature": 1.0,
            "optim.lr": 1e-6,
            "reward.components.accuracy.weight": 1.0,
            "reward.components.format.weight": 1.0,
        },
    ),
    # GRPO (DeepSeekMath, arXiv 2402.03300): the spec's literature defaults. The dapo and dr_grpo
    # configs also run under the name grpo: their (intended) kl.coef 0 is listed as a difference.
    "grpo": Recipe(
        label="GRPO",
        source="DeepSeekMath (arXiv 2402.03300)",
        values={
            "algorithm.kl.estimator": "k3",
            "algorithm.kl.coef": 0.04,
            "rollout.group_size": 8,
            "rollout.temperature": 1.0,
            "optim.lr": 1e-6,
        },
    ),
}

_UNSET = object()


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-15)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def _show(v: Any) -> str:
    if v is _UNSET:
        return "<unset>"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_show(x) for x in v) + "]"
    return str(v)


def recipe_for(cfg: DictConfig | dict) -> Recipe | None:
    """The recipe of the run's ``algorithm.name`` (None for an algorithm without one)."""
    cfg = cfg if isinstance(cfg, DictConfig) else OmegaConf.create(cfg)
    return RECIPES.get(str(OmegaConf.select(cfg, "algorithm.name", default="")))


def recipe_differences(cfg: DictConfig | dict) -> list[str]:
    """One line per key where the composed run config ``cfg`` differs from the recipe of its
    ``algorithm.name``: ``"optim.betas=[0.9, 0.999] (APO recipe: [0.9, 0.95])"``, in the
    table's order. An algorithm without a recipe (a plugin, dapo's name) gives []."""
    cfg = cfg if isinstance(cfg, DictConfig) else OmegaConf.create(cfg)
    recipe = recipe_for(cfg)
    if recipe is None:
        return []
    out = []
    for key, want in recipe.values.items():
        got = OmegaConf.select(cfg, key, default=_UNSET, throw_on_missing=False)
        if isinstance(got, DictConfig) or OmegaConf.is_list(got):
            got = OmegaConf.to_container(got, resolve=True)
        if got is _UNSET or not _same(got, want):
            out.append(f"{key}={_show(got)} ({recipe.label} recipe: {_show(want)})")
    return out


def recipe_note(cfg: DictConfig | dict) -> str | None:
    """``"APO recipe differs in: a; b"`` for the start-up log, or None when nothing differs."""
    diffs = recipe_differences(cfg)
    if not diffs:
        return None
    return f"{recipe_for(cfg).label} recipe differs in: " + "; ".join(diffs)
