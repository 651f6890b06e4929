"""reap-fast: REAP expert pruning of Mixture-of-Experts LLMs with the statistics computed inside the
MoE forward pass (reference PyTorch or fused Triton kernels).

The pipeline, one module each: ``data`` (calibration batches) -> ``observe`` (engines, Observer) ->
``metrics`` (accumulators, upstream .pt format) -> ``prune`` (scores, selection, slicing, saving) ->
``quantize`` (AutoRound W4A16) -> ``pipeline`` (``reap-fast run``). Submodules load lazily, so
``import reap_fast`` stays cheap.
"""

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "Observer": "reap_fast.observe",
    "load_model": "reap_fast.observe",
    "observe_checkpoint": "reap_fast.observe",
    "build_calibration_set": "reap_fast.data",
    "load_metrics": "reap_fast.metrics",
    "save_metrics": "reap_fast.metrics",
    "select_experts": "reap_fast.prune",
    "prune_model": "reap_fast.prune",
    "save_pruned": "reap_fast.prune",
    "prune_checkpoint": "reap_fast.prune",
    "Pipeline": "reap_fast.pipeline",
    "PipelineConfig": "reap_fast.pipeline",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'reap_fast' has no attribute {name!r}")
