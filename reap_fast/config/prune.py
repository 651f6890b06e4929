"""The prune stage's settings: ``reap-fast prune``, the prune step of ``reap-fast run`` and of the drop-in."""

from __future__ import annotations

from dataclasses import dataclass

from .checks import ConfigError, DEFAULT_SEED, check_choice, check_integer, check_range
from .observe import DTYPE_CHOICES

DEFAULT_METHOD = "reap"
DEFAULT_COMPRESSION_RATIO = 0.5  # upstream REAP's default; used when neither budget is given


class SelectionError(ConfigError):
    """An impossible pruning request (bad ratio or count, too few experts left, bad groups)."""


@dataclass(frozen=True)
class PruneConfig:
    """How to prune: the budget, the score, the per-layer floor, super experts, and how the model is loaded.

    The budget is ``compression_ratio`` (the fraction of experts removed per layer, in (0, 1)) or
    ``n_experts_to_prune`` (experts removed per layer), not both; with neither, the ratio is
    ``DEFAULT_COMPRESSION_RATIO``. Whether a budget fits a model (top-k, routing groups, the floor) is
    checked against the model by :func:`reap_fast.prune.check_prune_budget`.
    """

    method: str = DEFAULT_METHOD  # score name (reap_fast.prune.scores); any per-expert key of the observation
    compression_ratio: float | None = None
    n_experts_to_prune: int | None = None
    seed: int = DEFAULT_SEED  # seeds the "random" method
    global_ranking: bool = False  # rank layer-normalised scores across layers
    min_experts_per_layer: int | None = None  # refuse a budget that leaves fewer per layer
    preserve_super_experts: bool = False  # never remove super experts (not in the last quarter of layers)
    preserve_outliers: bool = False  # never remove super experts of any layer
    device: str = "auto"  # where the weights are loaded when they must be (auto, cpu, cuda, cuda:N)
    dtype: str = "auto"  # auto (the checkpoint's own), bfloat16, float16, float32
    overwrite: bool = False  # replace a model reap-fast saved in the output folder before

    def __post_init__(self) -> None:  # each setting named as the user knows it, with its command-line flag
        ratio, count = self.compression_ratio, self.n_experts_to_prune
        if ratio is not None and count is not None:
            raise SelectionError(
                "give either compression_ratio (--compression-ratio) or n_experts_to_prune (--n-experts-to-prune), "
                "not both"
            )
        if ratio is None and count is None:
            object.__setattr__(self, "compression_ratio", DEFAULT_COMPRESSION_RATIO)
        elif ratio is not None and not 0.0 < float(ratio) < 1.0:  # its own words: scripts match "outside (0, 1)"
            raise SelectionError(
                f"compression_ratio={ratio} (--compression-ratio) is outside (0, 1): it is the fraction of experts removed"
            )
        check_integer("n_experts_to_prune (--n-experts-to-prune)", count, SelectionError)
        check_range("n_experts_to_prune (--n-experts-to-prune)", count, 1)  # 0 would copy the model, as ratio 0
        check_range("min_experts_per_layer (--min-experts-per-layer)", self.min_experts_per_layer, 1)
        check_choice("dtype (--dtype)", self.dtype, DTYPE_CHOICES)
        if self.preserve_super_experts and self.preserve_outliers:
            raise SelectionError("only one of preserve_super_experts or preserve_outliers can be set")
