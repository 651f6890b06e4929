"""The entry points' log handler follows sys.stderr, so a closed earlier stream never breaks logging."""

import io
import logging
import sys

from reap_fast.logs import CurrentStderrHandler, configure_logging


def test_handler_writes_to_the_stderr_of_the_moment(monkeypatch):
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", [])  # as in a fresh process: configure_logging installs its handler
    monkeypatch.setattr(root, "level", root.level)
    first = io.StringIO()
    monkeypatch.setattr(sys, "stderr", first)
    configure_logging("%(levelname)s %(message)s")
    assert [type(handler) for handler in root.handlers] == [CurrentStderrHandler]
    logging.getLogger("reap_fast.test").info("one")
    first.close()  # e.g. pytest's capture of an earlier test, or a caller's redirect, is gone
    second = io.StringIO()
    monkeypatch.setattr(sys, "stderr", second)
    logging.getLogger("reap_fast.test").info("two")
    assert second.getvalue() == "INFO two\n"  # no "--- Logging error ---", and the record is not lost


def test_configured_logging_is_left_alone(monkeypatch):
    root = logging.getLogger()
    existing = logging.NullHandler()
    monkeypatch.setattr(root, "handlers", [existing])
    configure_logging("%(message)s")
    assert root.handlers == [existing]
