"""A config file cannot run code. Hydra itself would: it instantiates ``hydra.callbacks``
(``_target_: torch.load`` runs a pickle), the launcher and sweeper named by their
``_target_``, and the classes and factories (``()``) of the logging configs
(``hydra.job_logging``, ``hydra.hydra_logging``), all before apo-rl's code starts. An
experiment file from elsewhere (``--config-dir=downloaded experiment=x``) could so run anything.

:func:`install` checks every config Hydra composes for the apo-rl commands, before Hydra uses
it (:func:`check_no_code`): Hydra callbacks are refused; a ``_target_`` is allowed only for
the launcher and the sweeper, and only Hydra's own (``hydra._internal.core_plugins.*``) or an
installed Hydra plugin's (``hydra_plugins.*``: joblib, submitit); a logging class or factory
only from ``logging`` (or ``colorlog``, Hydra's colorlog plugin). apo-rl itself instantiates
nothing from a config; a checkpoint's stored config is checked on resume (its ``plugins:``
must be named again, :func:`framework.checkpoint.resume_config`).
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from framework.errors import ConfigError

TARGET_PREFIXES = ("hydra._internal.core_plugins.", "hydra_plugins.")
LOGGING_PREFIXES = ("logging.", "colorlog.")
TARGET_NODES = ("hydra.launcher", "hydra.sweeper")  # the only nodes whose _target_ Hydra may instantiate


def _walk(node: Any, path: str):
    if isinstance(node, dict):
        for k, v in node.items():
            yield f"{path}.{k}" if path else str(k), k, v
            yield from _walk(v, f"{path}.{k}" if path else str(k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _walk(v, f"{path}[{i}]")


def code_in_config(cfg: DictConfig | dict) -> list[str]:
    """The places in ``cfg`` (a composed config, Hydra's node included) that would run code:
    ``key=value`` strings; empty when there are none."""
    raw = OmegaConf.to_container(cfg, resolve=False) if isinstance(cfg, (DictConfig, ListConfig)) else cfg
    found = []
    for path, key, value in _walk(raw, ""):
        if key == "_target_":  # a Hydra callback's (hydra.callbacks.<name>._target_) included
            node = path.rsplit(".", 1)[0]
            if not (node in TARGET_NODES and str(value).startswith(TARGET_PREFIXES)):
                found.append(f"{path}={value}")
        elif (
            path.startswith(("hydra.job_logging.", "hydra.hydra_logging."))
            and key in ("()", "class")
            and not str(value).startswith(LOGGING_PREFIXES)
        ):
            found.append(f"{path}={value}")
    return found


def check_no_code(cfg: DictConfig | dict) -> None:
    """Refuse a config that would run code (:func:`code_in_config`), naming the keys."""
    found = code_in_config(cfg)
    if found:
        raise ConfigError(
            f"the config names code to run: {'; '.join(found)}. apo-rl refuses Hydra callbacks and any _target_ "
            f"outside hydra.launcher / hydra.sweeper ({', '.join(TARGET_PREFIXES)}), and logging classes outside "
            f"{', '.join(LOGGING_PREFIXES)}: remove them from the config file (a config from elsewhere is data, never code)"
        )


def install() -> None:
    """Check every config Hydra composes in this process before Hydra uses it (idempotent)."""
    from hydra._internal.config_loader_impl import ConfigLoaderImpl

    load = ConfigLoaderImpl.load_configuration
    if getattr(load, "_apo_rl_checked", False):
        return

    def load_configuration(self, *args, **kwargs):
        cfg = load(self, *args, **kwargs)
        check_no_code(cfg)
        return cfg

    load_configuration._apo_rl_checked = True  # type: ignore[attr-defined]
    ConfigLoaderImpl.load_configuration = load_configuration  # type: ignore[method-assign]
