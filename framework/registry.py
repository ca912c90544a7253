"""One small generic registry, used for algorithms, rewards, rollout engines, tasks and tools.

Register with a decorator::

    from framework.registry import ALGORITHMS

    @ALGORITHMS.register("my_algo")
    class MyAlgo(GRPO): ...

Third-party packages register without editing this project in either of two ways:

* a Python entry point in the group ``apo_rl.<kind>`` (e.g. ``apo_rl.algorithms``) whose
  value is a module to import (``my_pkg.my_algo``) or an object; it is loaded the first
  time the registry is queried;
* a module named in the config: ``plugins=[my_pkg.my_algo]`` imports it before the run
  resolves any name.

An unknown name raises :class:`UnknownNameError`, which lists every registered name; a
plugin that cannot be imported raises :class:`PluginImportError`. Both are user errors
(:class:`framework.errors.UserError`): the CLIs print them as one line.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Mapping
from importlib.metadata import entry_points
from typing import Any

from framework.errors import ConfigError, DependencyError, UnknownNameError, UserError


class PluginImportError(DependencyError):
    """A plugin module (``plugins=[...]``) or entry point that cannot be imported; names it and
    the error, and says to install it or put it on PYTHONPATH."""


class Registry:
    def __init__(self, kind: str, entry_point_group: str | None = None):
        self.kind = kind
        self.entry_point_group = entry_point_group or f"apo_rl.{kind}s"
        self._items: dict[str, Any] = {}
        self._entry_points_loaded = False
        self._defaults_module: str | None = None

    def set_defaults_module(self, module: str) -> None:
        """Module whose import registers the built-in entries (imported lazily)."""
        self._defaults_module = module

    def register(self, name: str, obj: Any = None, *, override: bool = False) -> Callable:
        """Register ``obj`` under ``name``; usable as ``@REG.register("name")``."""

        def deco(o: Any) -> Any:
            if name in self._items and self._items[name] is not o and not override:
                raise ConfigError(
                    f"{self.kind} '{name}' is already registered by "
                    f"{_describe(self._items[name])}; pass override=True to replace it"
                )
            self._items[name] = o
            return o

        return deco(obj) if obj is not None else deco

    def _load(self) -> None:
        if self._defaults_module:
            importlib.import_module(self._defaults_module)
        if self._entry_points_loaded:
            return
        self._entry_points_loaded = True
        for ep in entry_points(group=self.entry_point_group):
            try:
                obj = ep.load()
            except Exception as e:  # a broken plugin must not take the framework down silently
                raise PluginImportError(
                    f"could not load {self.kind} plugin entry point '{ep.name} = {ep.value}' "
                    f"(group {self.entry_point_group}): {e}"
                ) from e
            if not _is_module(obj) and ep.name not in self._items:
                self._items[ep.name] = obj

    def names(self) -> list[str]:
        self._load()
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        self._load()
        return name in self._items

    def get(self, name: str) -> Any:
        self._load()
        if name not in self._items:
            raise UnknownNameError(
                f"unknown {self.kind} '{name}'. Registered {self.kind}s: "
                f"{', '.join(self.names()) or '(none)'}. A plugin registers with "
                f"@{self.kind.upper()}S.register('{name}') in a module named in "
                f"plugins=[...] or in the entry-point group '{self.entry_point_group}'."
            )
        return self._items[name]

    def __repr__(self) -> str:
        return f"Registry({self.kind}: {', '.join(self.names())})"


def _is_module(obj: Any) -> bool:
    return type(obj).__name__ == "module"


def _describe(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"


def plugin_modules(value: Any) -> list[str]:
    """The module names of ``plugins=``: a list of names, or one name (``plugins=my_module`` is
    ``plugins=[my_module]``, never read character by character); anything else is a
    :class:`ConfigError`."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value] if value.strip() else []
    try:
        names = list(value)
    except TypeError:
        names = None
    if names is None or isinstance(value, Mapping) or not all(isinstance(m, str) and m.strip() for m in names):
        raise ConfigError(
            f"plugins={value!r}: give the module names to import as a list, plugins=[my_pkg.my_module,other_module]"
        )
    return [str(m) for m in names]


def import_plugins(modules: Iterable[str] | str | None) -> None:
    """Import plugin modules named in the config (``plugins=[pkg.mod, ...]`` or one name). A
    module that cannot be found, a relative name (``.mod``) and a module that raises while it is
    imported are each one :class:`PluginImportError` naming the module and the error."""
    for mod in plugin_modules(modules):
        where = f"plugin module '{mod}' (from plugins=[...])"
        if mod.startswith(".") or not all(part.isidentifier() for part in mod.split(".")):
            raise PluginImportError(
                f"{where} is not an importable module name: give its absolute dotted name "
                "(my_pkg.my_module), with its folder on PYTHONPATH"
            )
        try:
            importlib.import_module(mod)
        except ImportError as e:
            raise PluginImportError(
                f"{where} could not be imported: {e}. Check that it is installed or on PYTHONPATH."
            ) from e
        except UserError:  # a plugin's own one-line error (e.g. a name registered twice) stays as it is
            raise
        except Exception as e:  # the module's own code failed: name it, its error and where
            tb = e.__traceback__
            while tb is not None and tb.tb_next is not None:
                tb = tb.tb_next
            at = f" at {tb.tb_frame.f_code.co_filename}:{tb.tb_lineno}" if tb is not None else ""
            msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
            if isinstance(e, SyntaxError):  # raised by the compiler: the place is the error's own
                at, msg = f" at {e.filename}:{e.lineno}", e.msg or ""
            raise PluginImportError(
                f"{where} raised {type(e).__name__}{': ' + msg if msg else ''} while it was imported{at}; "
                "fix the module (APO_RL_DEBUG=1 shows the traceback)"
            ) from e


ALGORITHMS = Registry("algorithm")
REWARDS = Registry("reward")
ROLLOUT_ENGINES = Registry("rollout_engine")
TASKS = Registry("task")
TOOLS = Registry("tool")  # entry-point group apo_rl.tools

ALGORITHMS.set_defaults_module("algorithms")
REWARDS.set_defaults_module("rewards")
ROLLOUT_ENGINES.set_defaults_module("framework.rollout")
TASKS.set_defaults_module("framework.data")
TOOLS.set_defaults_module("tools")
