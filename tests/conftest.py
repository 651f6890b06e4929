"""Test set-up: Triton runs under its CPU interpreter when no GPU is present (set before triton loads)."""

import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, str(Path(__file__).parent))  # the float64 oracle (tests/oracle.py) is shared by all tests
