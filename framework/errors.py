"""The errors a user can fix. Every one derives from :class:`UserError`; the CLIs
(``framework.run``, ``benchmarks.evaluate``, ``benchmarks.run``) print such an error as one
line, ``error: <message>``, and exit with status 2 (``APO_RL_DEBUG=1`` shows the traceback).

Each message names the problem and the fix. Anything else that escapes is a bug and keeps
its traceback. The subclasses keep a builtin base (``ValueError``, ``KeyError``, ...) so that
code catching the builtin still works.
"""

from __future__ import annotations


class UserError(Exception):
    """Base of every error whose message tells the user what to change."""

    def __str__(self) -> str:  # KeyError would quote the message; a user error reads as a sentence
        return str(self.args[0]) if self.args else ""


class ConfigError(UserError, ValueError):
    """A bad config value; the message names the key and what is allowed."""


class UnknownNameError(UserError, KeyError):
    """A name (algorithm, reward, engine, task) that no plugin registered; lists the names."""


class ModelNotFoundError(UserError, FileNotFoundError):
    """Weights or a processor that cannot be found or loaded; says where to point instead."""


class DataError(UserError, ValueError):
    """Data records that cannot be used; names the file, the record and the problem."""


class DependencyError(UserError, ImportError):
    """An optional package (vLLM, a plugin's module) that is missing or cannot be imported;
    says what to install or fix."""


class Preempted(UserError):
    """The run was stopped by SIGTERM or SIGUSR1 (a scheduler's preemption) after writing a
    checkpoint of its last completed step; ``resume=<run folder>`` continues it. The CLI exits
    with :data:`EXIT_PREEMPTED`, which schedulers and ``benchmarks.run`` read as "requeue"."""

    exit_code = 75  # EX_TEMPFAIL: a temporary failure, try again


class Interrupted(Preempted):
    """The run was stopped by Ctrl-C (SIGINT) after writing a checkpoint of its last completed
    step; ``resume=<run folder>`` continues it. Exit status 130, as a shell reports a Ctrl-C."""

    exit_code = 130


class NonFiniteError(UserError, FloatingPointError):
    """A non-finite loss or gradient; names the RL step, the optimizer step and the quantity."""


EXIT_PREEMPTED = Preempted.exit_code


def one_line(e: BaseException) -> str:
    """The message of a user error as it is printed: one line (line breaks joined), never empty."""
    text = " ".join(part.strip() for part in str(e).strip().splitlines() if part.strip())
    return text or type(e).__name__
