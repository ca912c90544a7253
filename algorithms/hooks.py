"""The hooks an :class:`algorithms.base.Algorithm` subclass may override, checked when the
algorithm is built (before any model loads).

A plugin whose override does not match the interface would otherwise fail with a raw
``TypeError`` deep inside the first RL step; :func:`check_hooks` names the hook, the
signature written and the one expected instead, and a method whose name is one letter away
from a hook's (``shape_reward``) is reported as a likely typo, since the trainer would never
call it.
"""

from __future__ import annotations

import difflib
import inspect

from framework.errors import ConfigError

# the methods of Algorithm a subclass overrides to change behaviour, in the order the
# trainer calls them (README, "Writing an algorithm")
HOOKS = (
    "shape_rewards",
    "compute_advantages",
    "shape_advantages",
    "sample_kl_coef",
    "loss_mask",
    "policy_objective",
    "keep_groups",
    "prepare",
    "loss",
)


def _params(fn) -> list[inspect.Parameter]:
    return list(inspect.signature(fn).parameters.values())


def _short(annotation) -> str:
    if isinstance(annotation, str):
        return annotation.rsplit(".", 1)[-1]
    return getattr(annotation, "__name__", str(annotation))


def _describe(name: str, fn) -> str:
    """``shape_advantages(self, rollout: Rollout, advantages: Tensor, metrics: dict) -> Tensor``."""
    sig = inspect.signature(fn)
    parts = []
    for p in sig.parameters.values():
        text = ("*" if p.kind == p.VAR_POSITIONAL else "**" if p.kind == p.VAR_KEYWORD else "") + p.name
        if p.annotation is not p.empty:
            text += f": {_short(p.annotation)}"
        if p.default is not p.empty:
            text += f"={p.default!r}"
        parts.append(text)
    ret = "" if sig.return_annotation is sig.empty else f" -> {_short(sig.return_annotation)}"
    return f"{name}({', '.join(parts)}){ret}"


def _compatible(expected: list[inspect.Parameter], got: list[inspect.Parameter]) -> bool:
    """``got`` accepts every call the trainer makes with ``expected``'s positional arguments:
    the same number of positional parameters (or ``*args``), extra ones only with defaults."""
    pos = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    need = [p for p in expected if p.kind in pos]
    have = [p for p in got if p.kind in pos]
    if any(p.kind == inspect.Parameter.VAR_POSITIONAL for p in got):
        return len([p for p in have if p.default is inspect.Parameter.empty]) <= len(need)
    if len(have) < len(need):
        return False
    return all(p.default is not inspect.Parameter.empty for p in have[len(need) :])


def _returns_none(fn) -> bool:
    """The method is annotated ``-> None``."""
    ret = inspect.signature(fn).return_annotation
    return ret is None or ret == "None"


def check_hooks(cls: type, base: type) -> None:
    """Raise :class:`ConfigError` when ``cls`` overrides a hook of ``base`` with a signature
    the trainer cannot call, or defines a method named like a misspelt hook."""
    where = f"{cls.__module__}.{cls.__qualname__}"
    for name in HOOKS:
        mine, theirs = getattr(cls, name, None), getattr(base, name, None)
        if mine is None or theirs is None or mine is theirs:
            continue
        if not callable(mine):
            raise ConfigError(f"algorithm {where}: {name} must be a method, found {type(mine).__name__}")
        if not _compatible(_params(theirs), _params(mine)):
            raise ConfigError(
                f"algorithm {where}: hook {_describe(name, mine)} does not match the interface "
                f"{_describe(name, theirs)}; see README, 'Writing an algorithm'"
            )
        if _returns_none(mine) and not _returns_none(theirs):  # e.g. shape_rewards set rollout.rewards before
            raise ConfigError(
                f"algorithm {where}: hook {_describe(name, mine)} returns nothing; the interface is "
                f"{_describe(name, theirs)}: return the value (the rollout is not changed in place); "
                "see README, 'Writing an algorithm'"
            )
    own = [n for n, v in vars(cls).items() if callable(v) and not n.startswith("_") and n not in HOOKS]
    for n in own:
        if hasattr(base, n):
            continue
        close = difflib.get_close_matches(n, HOOKS, n=1, cutoff=0.9)
        if close:
            raise ConfigError(
                f"algorithm {where}: method {n} is not a hook and would never be called; "
                f"did you mean {_describe(close[0], getattr(base, close[0]))}?"
            )
