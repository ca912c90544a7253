"""Where the installed package keeps what is not code.

The Hydra configs live in the repository's top-level ``configs/`` and are installed as the
package ``framework.configs`` (pyproject.toml maps the folder there; an editable install maps
it too). Every code path finds them through the package: a wheel installed into any
environment and run from any folder composes the same configs as the clone.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

CONFIG_PACKAGE = "framework.configs"
# Hydra's search path for the primary config (hydra.main / initialize_config_module)
HYDRA_CONFIG_PATH = f"pkg://{CONFIG_PACKAGE}"


def config_dir() -> Path:
    """The installed config folder (``<site-packages>/framework/configs``, or the clone's
    ``configs/`` under an editable install)."""
    return Path(str(files(CONFIG_PACKAGE)))


def config_file(group: str, name: str) -> Path:
    """``<config_dir>/<group>/<name>.yaml``."""
    return config_dir() / group / f"{name}.yaml"


def compose_config(overrides=(), config_name: str = "config"):
    """The config ``apo-rl <overrides>`` composes (Hydra's compose API on the installed configs),
    as a DictConfig. Inside a running Hydra app (``apo-rl``, ``apo-rl-sweep``) it composes with
    a fresh Hydra on the package configs and then gives the app its own Hydra back."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    import framework.config  # noqa: F401  (registers the typed groups' ``base`` options)

    gh = GlobalHydra.instance()
    running = gh.hydra if gh.is_initialized() else None
    gh.clear()
    try:
        with initialize_config_module(config_module=CONFIG_PACKAGE, version_base="1.3"):
            return compose(config_name, overrides=list(overrides))
    finally:
        if running is not None:
            GlobalHydra.instance().initialize(running)
