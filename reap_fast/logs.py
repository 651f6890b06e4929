"""Logging set-up for the command-line entry points."""

from __future__ import annotations

import logging
import sys


class CurrentStderrHandler(logging.StreamHandler):
    """Writes each record to ``sys.stderr`` as it is *at that moment*.

    A plain ``StreamHandler`` keeps the stream it was created with; when an entry point runs inside a
    process that later swaps or closes that stream (pytest's capture, a caller's redirect), every later
    record fails with "--- Logging error ---". Resolving ``sys.stderr`` per record avoids that.
    """

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ assigns it; the current stderr always wins
        pass


def configure_logging(fmt: str) -> None:
    """INFO-level logging to the current stderr in ``fmt``, unless the application configured logging already."""
    logging.basicConfig(level=logging.INFO, format=fmt, handlers=[CurrentStderrHandler()])
