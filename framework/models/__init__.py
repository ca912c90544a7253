"""Models: loading (``loading``), the built-in tiny models (``tiny``) and their warm-start
(``warmstart``). Imports run one way, tiny <- loading <- warmstart; warmstart is imported here
so that it registers the ``tiny:KIND-sft`` names that ``loading.resolve_path`` resolves."""

from framework.models import warmstart  # noqa: F401  (registers tiny:KIND-sft)
