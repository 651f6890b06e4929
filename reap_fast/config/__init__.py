"""Frozen, validated settings of each stage: every setting is declared here, once.

A stage function takes paths and its config (``observe_checkpoint(model, dataset, out, ObserveConfig(...))``).
Each field declares its default, range, help and flag spellings (:mod:`.declare`); the flags of the CLI, of
``run`` and of the upstream drop-in are generated from those declarations (:mod:`.flags`).

Each stage owns one module here (``observe``, ``prune``, ``quantize``, ``evaluate``); this package imports
nothing of reap_fast above ``errors``.
"""

from __future__ import annotations

from .checks import ConfigError, check_choice, check_integer, check_range
from .evaluate import EvalConfig, HarnessError, HarnessSettings
from .observe import DEFAULT_MODEL_MAX_LENGTH, ObserveConfig
from .prune import DEFAULT_COMPRESSION_RATIO, PruneConfig, SelectionError
from .quantize import QuantConfig

__all__ = ["ConfigError", "check_choice", "check_integer", "check_range"]
__all__ += ["DEFAULT_MODEL_MAX_LENGTH", "ObserveConfig"]
__all__ += ["DEFAULT_COMPRESSION_RATIO", "PruneConfig", "SelectionError"]
__all__ += ["QuantConfig"]
__all__ += ["EvalConfig", "HarnessError", "HarnessSettings"]
