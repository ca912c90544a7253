"""apo-rl's framework: the RL step, rollouts, data, models and the run's config.

Importing the package registers the typed config schemas as the ``base`` options of their
Hydra groups (:func:`framework.config.register_schemas`), so any entry point that composes
``configs/`` (the CLIs, the tests, a user's script) finds them.
"""

from framework import config as _config  # noqa: F401
