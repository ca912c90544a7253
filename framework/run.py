"""Command-line entry point: ``python -m framework.run algorithm=apo model=qwen2_5_vl_3b``.

Any config value can be overridden (``trainer.max_steps=100``); ``-m`` sweeps
(``-m algorithm=grpo,grpo_d,apo seed=0,1,2``); ``--cfg job`` prints the composed config.

A mistake the user can fix (a :class:`framework.errors.UserError`: a bad config value, an
unknown name, a missing model, unusable data, a non-finite loss) is printed as one line,
``error: <message>``, with exit status 2; ``APO_RL_DEBUG=1`` shows its traceback instead.
Anything else is a bug and keeps its traceback. The same handling and the console logging
below are shared by ``benchmarks.evaluate`` and ``benchmarks.run``.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import hydra
from omegaconf import DictConfig

from framework.errors import UserError, one_line

CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "configs")

DEBUG_ENV = "APO_RL_DEBUG"
DEBUG_HINT = f"(set {DEBUG_ENV}=1 for the full traceback)"
EXIT_USER_ERROR = 2
# the packages whose modules log with logging.getLogger(__name__)
LOGGERS = ("framework", "algorithms", "rewards", "benchmarks")


class _ConsoleHandler(logging.StreamHandler):
    """A handler writing to whatever ``sys.stdout`` (or ``sys.stderr``) is when a message is
    emitted (a redirected or captured stream included); flushed after every message."""

    def __init__(self, stream: str = "stdout"):
        if stream not in ("stdout", "stderr"):
            raise ValueError(f"stream must be 'stdout' or 'stderr', not {stream!r}")
        self._stream_name = stream
        super().__init__()

    @property
    def stream(self):  # type: ignore[override]
        return getattr(sys, self._stream_name)

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ / setStream: the stream is looked up per message
        pass


def setup_console_logging(level: int = logging.INFO, stream: str = "stdout") -> None:
    """apo-rl's own messages (the ``framework``, ``algorithms``, ``rewards`` and ``benchmarks``
    loggers) as plain text, one message per line, on ``stream``, from ``level`` up.

    They do not propagate to the root logger, so Hydra's job logging (``[time][name][LEVEL]``
    on the console, the run's ``.log`` file) does not print them a second time. Calling it
    again replaces the handler (idempotent)."""
    fmt = logging.Formatter("%(message)s")
    for name in LOGGERS:
        logger = logging.getLogger(name)
        for h in [h for h in logger.handlers if isinstance(h, _ConsoleHandler)]:
            logger.removeHandler(h)
        handler = _ConsoleHandler(stream)
        handler.setFormatter(fmt)
        logger.addHandler(handler)
        logger.setLevel(level)
        logger.propagate = False
        logger.disabled = False
    quiet_third_party()


class _DropMessages(logging.Filter):
    def __init__(self, *needles: str):
        super().__init__()
        self.needles = needles

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not any(n in msg for n in self.needles)


def quiet_third_party() -> None:
    """Third-party output a user cannot act on, filtered at its source (by logger and message,
    never globally): Lightning's lines printed twice (its own handler and Hydra's root
    handler), its LitLogger advertisement and weights_only notice, a deprecation warning from
    inside Lightning, and transformers' progress bars on every load and save."""
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).propagate = False  # Lightning prints through its own handler, once
    drop = _DropMessages("litlogger", "LitLogger", "`weights_only` was not set")
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.pytorch.trainer.connectors.checkpoint_connector"):
        logging.getLogger(name).addFilter(drop)
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*", module=r"lightning\..*")
    warnings.filterwarnings("ignore", message=r".*treespec.*LeafSpec.*")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # "Loading weights" / "Writing model shards" bars
    except ImportError:  # pragma: no cover - transformers is a dependency
        pass


def debug_enabled() -> bool:
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


def report_user_error(e: UserError) -> None:
    """``error: <one line>`` and the debug hint on stderr."""
    print(f"error: {one_line(e)}", file=sys.stderr)
    print(DEBUG_HINT, file=sys.stderr)
    sys.stderr.flush()


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn a :class:`UserError` into one ``error:`` line and exit status 2 (``APO_RL_DEBUG=1``
    re-raises it, traceback included). Any other exception passes through untouched."""
    try:
        yield
    except UserError as e:
        if debug_enabled():
            raise
        report_user_error(e)
        sys.exit(getattr(e, "exit_code", EXIT_USER_ERROR))  # 2; a preempted run: 75 (requeue it)


@hydra.main(config_path=CONFIG_DIR, config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    setup_console_logging()
    with user_errors():
        from framework.train import train

        result = train(cfg)
    acc = result.metric("eval/accuracy")
    return acc[-1] if acc else None


if __name__ == "__main__":
    main()
