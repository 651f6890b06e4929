"""One base class for every error that means "the user's input or situation prevents this".

The command lines (``reap-fast`` and the upstream drop-in) print such an error as one line and exit
with its :attr:`ReapFastError.exit_code`; anything else is a bug and keeps its traceback.

Which built-in a subclass also derives from, exactly one of them (``tests/test_errors.py`` checks it):

* ``ValueError``: the error is about something the caller passed: a setting, an argument, a flag
  combination, or a file or folder they named and what it holds (a model folder, an observation file,
  calibration or texts files). Most errors are of this kind.
* ``RuntimeError``: the error is about the machine or the moment: memory, an engine or package that
  cannot run here, another process holding the output, a disk that cannot take the write.
* an ``OSError`` kind where one names the situation exactly (``FileExistsError``: an output in the way).

An error re-raised as another type keeps the original's type: it is raised again unchanged, or as a
subclass of it.
"""

from __future__ import annotations

EXIT_USAGE = 2
EXIT_CANNOT_WRITE = 1  # the disk filled up or turned read-only during the work
EXIT_INTERRUPTED = 130


class ReapFastError(Exception):
    """A user-facing error: one line of text, shown without a traceback."""

    exit_code: int = EXIT_USAGE

    def __init__(self, message: str = "") -> None:
        super().__init__(" ".join(str(message).split()))


class UsageError(ReapFastError, ValueError):
    """A setting or argument value that cannot work (batch size 0, a flag combination)."""


class EngineUnavailableError(ReapFastError, RuntimeError):
    """The requested observation engine cannot run here (e.g. Triton without a GPU or interpreter)."""


def one_line(exc: BaseException) -> str:
    """The first line of an exception's message (library errors often run to several lines)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else exc.__class__.__name__
