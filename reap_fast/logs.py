"""Logging set-up for the command-line entry points."""

from __future__ import annotations

import logging
import os
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


# Library chatter that says nothing to a reap-fast user: datasets' "Generating train split" bars, transformers'
# warnings (the tokenizer's "sequence length is longer than the maximum" among them: packing cuts sequences
# itself). Set in the environment, so child processes inherit them; a user's own setting wins.
QUIET_ENVIRONMENT = {"HF_DATASETS_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_VERBOSITY": "error"}


def quiet_libraries() -> None:
    """Silence the libraries' clutter (see :data:`QUIET_ENVIRONMENT`) in this process and its children."""
    for name, value in QUIET_ENVIRONMENT.items():
        os.environ.setdefault(name, value)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    if "datasets" in sys.modules:  # read at import: tell an already imported datasets too
        from datasets.utils.logging import disable_progress_bar

        disable_progress_bar()


def tame_logger(name: str, level: int = logging.WARNING) -> logging.Logger:
    """Route a library's own logger (auto-round's colours and INFO flood) through ours at ``level``."""
    library = logging.getLogger(name)
    library.handlers = [handler for handler in logging.getLogger().handlers] or [CurrentStderrHandler()]
    library.propagate = False
    library.setLevel(level)
    return library
