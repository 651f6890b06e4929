"""The evaluation stage: held-out perplexity and next-token accuracy (``scoring``, each saved model scored in
a child by ``heldout``), lm-evaluation-harness tasks (``harness``, one child per model) and the table
comparing several models (``comparison``). Settings: :class:`reap_fast.config.EvalConfig`."""

from __future__ import annotations

from ..config.evaluate import EvalConfig, HarnessError, HarnessSettings
from .comparison import Comparison, ModelEntry, comparison_rows, format_table, run_comparison
from .scoring import EvalError, EvalRows, combine_results, evaluate_rows, pack_texts, perplexity

__all__ = [
    "Comparison", "EvalConfig", "EvalError", "EvalRows", "HarnessError", "HarnessSettings", "ModelEntry",
    "combine_results", "comparison_rows", "evaluate_rows", "format_table", "pack_texts", "perplexity",
    "run_comparison",
]
