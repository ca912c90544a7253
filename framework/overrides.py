"""Hydra's composition errors as the project's one-line errors.

An override of a key that does not exist (``trainer.max_step=5``) fails inside Hydra's
composition, before any apo-rl code runs; :func:`composition_error` turns it into the same
:class:`ConfigError` that ``+trainer.max_step=5`` gets from the typed sections: the key, a
close name where there is one, and the allowed keys."""

from __future__ import annotations

import difflib
import re

from omegaconf import DictConfig

from framework.errors import ConfigError


def unknown_key_error(key: str, allowed, where: str) -> ConfigError:
    """``unknown key 'trainer.max_step'; did you mean 'trainer.max_steps'? allowed keys in
    trainer: ...``: one line for every unknown key, whichever way it was given."""
    allowed = [str(a) for a in allowed]
    last = key.rsplit(".", 1)[-1]
    close = difflib.get_close_matches(last, allowed, n=1, cutoff=0.6)
    prefix = key[: -len(last)]
    hint = f" did you mean '{prefix}{close[0]}'?" if close else ""
    return ConfigError(f"unknown key '{key}';{hint} allowed keys in {where}: {', '.join(allowed)}")


_COULD_NOT_OVERRIDE = re.compile(r"Could not override '([^']+)'")


def composition_error(e: Exception, argv: list[str], config_name: str) -> ConfigError:
    """The one-line error for a Hydra composition exception ``e`` raised for ``argv``."""
    msg = str(e)
    m = _COULD_NOT_OVERRIDE.search(msg)
    if m:
        key = m.group(1)
        rest = [a for a in argv if not _overrides_key(a, key)]
        return _unknown(key, _compose_or_none(rest, config_name))
    missing = re.search(r"Could not find '([^']+)'", msg)
    if missing and "Available options in '" in msg:  # an unknown option of a group: list the options
        body = msg.split("Available options in '", 1)[1]
        group = body.split("'", 1)[0]
        options = []
        for line in body.splitlines()[1:]:
            if not line.strip() or line.startswith("Config search path"):
                break
            if line.strip() != "base":  # the typed schema every option starts from, not a choice
                options.append(line.strip())
        return ConfigError(f"no config '{missing.group(1)}'; options of {group}: {', '.join(options)}")
    # other composition errors (a parse error, ...): Hydra's message, one line
    lines = [ln.strip() for ln in msg.splitlines() if ln.strip()]
    cause = e.__cause__
    if cause is not None and str(cause).strip():
        lines.append(str(cause).strip().splitlines()[0])
    return ConfigError("; ".join(lines) or type(e).__name__)


def _overrides_key(arg: str, key: str) -> bool:
    return arg.split("=", 1)[0].lstrip("+~") == key


def _compose_or_none(argv: list[str], config_name: str) -> DictConfig | None:
    from framework.resources import compose_config

    overrides = [a for a in argv if "=" in a and not a.startswith("-")]
    try:
        return compose_config(overrides, config_name=config_name)
    except Exception:
        return None


def _unknown(key: str, cfg: DictConfig | None) -> ConfigError:
    parts = key.split(".")
    node, where = cfg, "the top level"
    for i, part in enumerate(parts[:-1]):
        child = node.get(part) if isinstance(node, DictConfig) else None
        if not isinstance(child, DictConfig):  # the missing part is this one: list its siblings
            return unknown_key_error(".".join(parts[: i + 1]), list(node.keys()) if node is not None else [], where)
        node, where = child, ".".join(parts[: i + 1])
    if not isinstance(node, DictConfig):
        return ConfigError(f"unknown key '{key}'")
    return unknown_key_error(key, list(node.keys()), where)
