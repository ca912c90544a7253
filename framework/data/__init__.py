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
from .schema import (
    COLUMNS,
    DEFAULT_MAX_IMAGE_BYTES,
    FEATURES,
    IMAGE_PLACEHOLDER,
    choice_letters,
    decode_image,
    read_image_file,
    to_record,
)
from .synthetic import reference_completion
from .validation import (
    REPORT_NAME,
    DataError,
    ValidationReport,
    check_record,
    control_token_list,
    validate_records,
    write_report,
)

__all__ = [
    "COLUMNS",
    "DEFAULT_MAX_IMAGE_BYTES",
    "FEATURES",
    "IMAGE_PLACEHOLDER",
    "REPORT_NAME",
    "DataError",
    "ValidationReport",
    "check_record",
    "choice_letters",
    "control_token_list",
    "decode_image",
    "load_data",
    "load_hub",
    "load_local",
    "prepare_data",
    "read_image_file",
    "reference_completion",
    "resolve_columns",
    "to_record",
    "validate_records",
    "write_report",
]
