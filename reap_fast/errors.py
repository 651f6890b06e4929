"""One base class for every error that means "the user's input or situation prevents this".

The command lines (``reap-fast`` and the upstream drop-in) print such an error as one line and exit
with its :attr:`ReapFastError.exit_code`; anything else is a bug and keeps its traceback. Subclasses
may also derive from a built-in (``ValueError``, ``FileExistsError``) so callers that caught those
keep working.
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
