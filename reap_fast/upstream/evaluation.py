"""The drop-in's ``--do_eval`` step (upstream runs ``eval.run_evaluate`` on the pruned model).

:func:`evaluate_pruned` is the one place the drop-in calls after pruning; it never skips silently.
Until lm-eval is wired in, it says in one line what was skipped and why.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any


def evaluate_pruned(pruned_dir: Path, eval_args: Any, seed: int) -> str:
    """Evaluate the pruned model in ``pruned_dir`` as ``--do_eval`` asks; returns the line printed."""
    tasks = ", ".join(getattr(eval_args, "lm_eval_tasks", []) or [])
    if importlib.util.find_spec("lm_eval") is None:
        reason = "lm-eval is not installed (pip install lm-eval)"
    else:
        reason = "the drop-in does not run upstream's evaluation suites yet"
    line = f"evaluation skipped: {reason}; tasks asked for: {tasks or 'none'} (--do_eval false silences this line)"
    print(line)
    return line
