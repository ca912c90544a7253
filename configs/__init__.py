"""apo-rl's Hydra configs, installed as the package ``framework.configs`` (pyproject.toml maps
this folder there), so that every install finds them through the package, never through the
source tree: Hydra reads them as ``pkg://framework.configs``."""
