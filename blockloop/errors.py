"""The errors a user can fix, with the exit code each command returns for them.

Every command prints one `error: ...` line for a `BlockloopError` and exits with its
`exit_code`; anything else is a bug and keeps its traceback. The classes also derive from the
built-in error a caller would expect (`ValueError` for bad values, `RuntimeError` for files), so
`except ValueError` keeps working for API users.
"""

from __future__ import annotations

import sys
from collections.abc import Callable


class BlockloopError(Exception):
    """Base of the user-fixable errors; `exit_code` is what a command exits with (2: bad input)."""

    exit_code = 2


class ConfigError(BlockloopError, ValueError):
    """A bad configuration value; the message names the key and what is allowed."""


class CheckpointError(BlockloopError, RuntimeError):
    """A checkpoint could not be written or read; the message names the file and the fix."""


class DataError(BlockloopError, ValueError):
    """A token data directory is missing, malformed or unusable; the message says how to fix it."""


class TaskError(BlockloopError, ValueError):
    """A task configuration or argument is invalid; the message names the key and what is allowed."""


class AnalysisError(BlockloopError, ValueError):
    """The analysis cannot run (no checkpoint, a model without looping, ...); says why."""


class SampleError(BlockloopError, ValueError):
    """Sampling cannot run as asked (bad option, prompt or checkpoint); says why."""


class ExperimentError(BlockloopError, ValueError):
    """A bad experiment file or option; the message names the file, the key and the fix."""


class PrepareError(BlockloopError, RuntimeError):
    """A dataset could not be prepared; the message names the input and the fix (exit code 1,
    as `blockloop prepare` has always returned)."""

    exit_code = 1


class DivergedError(BlockloopError, FloatingPointError):
    """Training produced a non-finite loss; the last good checkpoint is kept (exit code 3)."""

    exit_code = 3


def one_line(error: BaseException) -> str:
    """The error's message folded onto one line, as commands print it after `error: `."""
    return " ".join(str(error).split())


def run_command(work: Callable[[], int | None]) -> int:
    """Run a command's `work` and return its exit code (None counts as 0). What the user can
    fix becomes one `error: ...` line on stderr instead of a traceback: a BlockloopError with
    its `exit_code`, an OSError (its message names the path) with 2, and a FloatingPointError
    (a diverged computation) with 3."""
    try:
        return work() or 0
    except (BlockloopError, OSError, FloatingPointError) as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        if isinstance(e, BlockloopError):
            return e.exit_code
        return 3 if isinstance(e, FloatingPointError) else 2
