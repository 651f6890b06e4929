"""Test set-up: Triton runs under its CPU interpreter when no GPU is present (set before triton loads)."""

import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, str(Path(__file__).parent))  # the float64 oracle (tests/oracle.py) is shared by all tests

# datasets and transformers give their library loggers a StreamHandler bound to sys.stderr as it is on first
# use. Configured inside a test, that stream is the test's capture, closed afterwards, and every later record
# prints "--- Logging error ---" with a traceback into another test's stderr. Configure them now, while
# sys.stderr is the session's.
import datasets.utils.logging  # noqa: E402
import transformers.utils.logging  # noqa: E402

datasets.utils.logging.get_verbosity()
transformers.utils.logging.get_verbosity()
