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

import hydra
from omegaconf import DictConfig

from framework.errors import UserError, one_line
from framework.resources import HYDRA_CONFIG_PATH

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
    """``error: <one line>`` and the debug hint on stderr. A run stopped on purpose (preempted:
    exit 75, Ctrl-C: 130) is no error: one ``apo-rl: <message>`` line with the resume command."""
    if getattr(e, "exit_code", EXIT_USER_ERROR) != EXIT_USER_ERROR:
        print(f"apo-rl: {one_line(e)}", file=sys.stderr)
    else:
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


@hydra.main(config_path=HYDRA_CONFIG_PATH, config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    setup_console_logging()
    with user_errors():
        from framework.train import train

        try:
            result = train(cfg)
        except KeyboardInterrupt:  # Ctrl-C before training started (during training: a checkpoint, exit 130)
            print("apo-rl: interrupted (Ctrl-C) before the first RL step: nothing to save", file=sys.stderr)
            sys.exit(130)
    acc = result.metric("eval/accuracy")
    return acc[-1] if acc else None


HELP = """\
apo-rl: reinforcement-learning fine-tuning of a vision-language model. Composes the run's
config from the config groups below (Hydra), checks it, and trains one run (GRPO, GRPO-D,
APO, ...) into outputs/<date>/<time>/ (metrics, checkpoints, W&B offline run).

  apo-rl algorithm=apo model=qwen2_5_vl_3b      choose an option of a group
  apo-rl trainer.max_steps=200 seed=1           set any key
  apo-rl experiment=view_r1_3b                  a paper's whole recipe
  apo-rl resume=outputs/2026-12-01/10-00-00     continue a run from its newest checkpoint
  apo-rl algorithm=apo --cfg job                print the composed config and stop
  apo-rl -m algorithm=grpo,apo seed=0,1         Hydra multirun"""


def cli() -> None:
    """The ``apo-rl`` command (``python -m framework.run`` runs the same)."""
    run_cli(main, config_name="config", prog="apo-rl", about=HELP)


def entry_command(module: str, *args: str) -> list[str]:
    """The command that runs the apo-rl entry point ``module`` (``framework.run``,
    ``benchmarks.evaluate``) in a new process as ``python -m <module>`` would, except that the
    current folder does not come first on ``sys.path``: a user's own ``framework/`` or
    ``benchmarks/`` folder cannot replace ours (:func:`run_cli` adds it at the end)."""
    return [sys.executable, "-c", f"import sys; sys.path.pop(0); from {module} import cli; cli()", *args]


def run_cli(main, *, config_name: str, prog: str, about: str) -> None:
    """Run the Hydra app ``main`` as an installed command: ``-h``/``--help`` prints ``about`` and
    where the config groups are; the current folder goes at the *end* of ``sys.path`` (a plugin
    module there imports with ``plugins=[my_module]``, but cannot shadow apo-rl's packages); a
    Hydra composition error (an unknown key without ``+``, an unknown group option, a syntax
    error) is one ``error:`` line and exit status 2, like every other config mistake."""
    from hydra.errors import HydraException

    argv = sys.argv[1:]
    if any(a in ("-h", "--help") for a in argv):
        try:
            print(about + "\n\n" + config_groups_help(config_name), flush=True)
        except BrokenPipeError:  # `apo-rl --help | head`: the reader left; no traceback (Python's docs)
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return
    if os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())
    # Hydra prints its own composition errors and exits 1 unless asked to raise them; raised,
    # they become the one-line errors below (a bug in the run keeps its whole traceback)
    os.environ["HYDRA_FULL_ERROR"] = "1"
    from framework.config_guard import install

    install()  # a config file cannot run code (Hydra callbacks, _target_): checked before Hydra uses it
    try:
        main()
    except UserError as e:  # raised while Hydra composes (framework.config_guard), before main's own handling
        if debug_enabled():
            raise
        report_user_error(e)
        sys.exit(EXIT_USER_ERROR)
    except HydraException as e:
        if debug_enabled():
            raise
        from framework.overrides import composition_error

        report_user_error(composition_error(e, argv, config_name))
        sys.exit(EXIT_USER_ERROR)


def config_groups_help(config_name: str) -> str:
    """Where the installed config groups are, their options, and how to add your own."""
    from framework.resources import config_dir

    root = config_dir()
    lines = [f"Config groups (in {root}; `--cfg job` prints the composed config):"]
    for group in sorted(p for p in root.iterdir() if p.is_dir() and p.name not in ("hydra", "__pycache__")):
        options = sorted(f.stem for f in group.glob("*.yaml"))
        lines.append(f"  {group.name}: {', '.join(options)}")
    lines.append(f"Primary config: {root / (config_name + '.yaml')}")
    lines.append(
        "Your own configs compose on top: --config-dir=<dir> with <dir>/<group>/<name>.yaml "
        "(or hydra.searchpath=[file://<dir>]). Hydra's own flags: --hydra-help."
    )
    return "\n".join(lines)


if __name__ == "__main__":
    cli()
