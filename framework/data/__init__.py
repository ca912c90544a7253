"""Data layer: one record schema (Hugging Face ``datasets``) for every source.

Importing this package registers the built-in tasks (``synthetic``, ``local``, ``hub`` and the
benchmark adapters ``mmmu``, ``mathverse``, ``mmstar``, ``r1v``) in
``framework.registry.TASKS`` (it is the registry's defaults module).
"""

from . import (
    benchmarks,  # noqa: F401,E402  (registers the benchmark adapter tasks)
    synthetic,  # noqa: F401  (registers the "synthetic" task)
)
from .loading import load_data, load_hub, load_local, prepare_data, resolve_columns
from .schema import COLUMNS, FEATURES, IMAGE_PLACEHOLDER, choice_letters, decode_image, to_record
from .synthetic import reference_completion
from .validation import DataError, ValidationReport, check_record, validate_records

__all__ = [
    "COLUMNS",
    "FEATURES",
    "IMAGE_PLACEHOLDER",
    "DataError",
    "ValidationReport",
    "check_record",
    "choice_letters",
    "decode_image",
    "load_data",
    "load_hub",
    "load_local",
    "prepare_data",
    "reference_completion",
    "resolve_columns",
    "to_record",
    "validate_records",
]
