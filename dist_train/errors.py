"""The errors a run ends with cleanly: one `error:` line and an exit code from exits.py, never a traceback.

Torch-free, so that the dist-train command and the config parser can catch them before importing
torch; config.py re-exports UserError and CheckpointError for older imports.
"""

from __future__ import annotations

from dist_train import exits


class UserError(ValueError):
    """A mistake the user can fix; reported as one line and a non-zero exit, never a traceback."""

    exit_code = exits.USER_ERROR


class CheckpointError(Exception):
    """A file that is not a loadable checkpoint of this format (broken, foreign, or newer)."""

    exit_code = exits.USER_ERROR


class NewerFormatError(CheckpointError):
    """A checkpoint written by a newer dist_train: never skipped, overwritten or pruned."""


class UnreadableError(CheckpointError):
    """A checkpoint this process may not read (another user's): nothing says it is broken, so it is
    never skipped for an older one (whose steps would be trained again, and the file replaced)."""


class DivergedError(Exception):
    """The loss (or the weights) became non-finite: nothing is saved from that step on."""

    exit_code = exits.DIVERGED


class SaveFailedError(Exception):
    """A checkpoint (or the run's config.json) could not be written: disk full, read-only, vanished."""

    exit_code = exits.SAVE_FAILED


class GaveUp(Exception):
    """--max-failures launches in a row failed without completing an epoch."""

    exit_code = exits.GAVE_UP


def environment_int(environ, name: str, default: int | None = None, minimum: int = 0) -> int:
    """An integer the launcher (torchrun, srun, sbatch) put in the environment; anything else, say
    a hand-set RANK=x or WORLD_SIZE=0, is a UserError naming the variable, not a traceback."""
    value = environ.get(name)
    if value is None and default is not None:
        return default
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = None
    if number is None or number < minimum:
        raise UserError(f"{name}={value!r} in the environment is not a whole number >= {minimum} (torchrun, "
                        "srun or sbatch set it; unset it to run one process)")
    return number


RUN_ERRORS = (UserError, CheckpointError, DivergedError, SaveFailedError, GaveUp)


def first_line(error: Exception) -> str:
    """The first line of an error's message, or its type's name where it has none."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__
