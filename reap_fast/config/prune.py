"""The prune stage's settings: ``reap-fast prune``, the prune step of ``reap-fast run`` and of the drop-in."""

from __future__ import annotations

from dataclasses import dataclass

from .checks import ConfigError, DEFAULT_SEED
from .declare import setting, validate
from .observe import DTYPE_CHOICES

DEFAULT_METHOD = "reap"
DEFAULT_COMPRESSION_RATIO = 0.5  # upstream REAP's default; used when neither budget is given
# upstream PruneArgs.prune_method choices (args.py), plus reap-fast's "random": what the flags accept (the API
# also takes any per-expert key of the observation file, checked against the file by reap_fast.prune.scores)
UPSTREAM_METHOD_CHOICES = ("frequency", "ean_ca", "ean_sum", "ean_mean", "weighted_frequency_sum", "weighted_ean_sum",
                           "weighted_ean_sum_l2", "reap", "reap_l2", "max_activations")
METHOD_CHOICES = UPSTREAM_METHOD_CHOICES + ("random",)


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

    method: str = setting(DEFAULT_METHOD, "saliency score (or any per-expert key of the observation file)",
                          cli="--method", upstream="prune_method", flag_choices=METHOD_CHOICES)
    compression_ratio: float | None = setting(
        None, f"fraction of experts removed per layer (default {DEFAULT_COMPRESSION_RATIO} without "
        "--n-experts-to-prune)", cli="--compression-ratio", upstream="compression_ratio", exclusive="budget")
    n_experts_to_prune: int | None = setting(None, "experts removed per layer", cli="--n-experts-to-prune",
                                             upstream="n_experts_to_prune", integer=True, low=1, exclusive="budget")
    seed: int = setting(DEFAULT_SEED, "seed of the 'random' method", cli="--seed", upstream="seed", integer=True)
    min_experts_per_layer: int | None = setting(
        None, "refuse a budget that leaves fewer experts per layer (default: the top-k)", cli="--min-experts-per-layer",
        dropin="min_experts_per_layer", integer=True, low=1)
    preserve_super_experts: bool = setting(
        False, "never remove super experts (max-activation outliers; not in the last quarter of the layers)",
        cli="--preserve-super-experts", upstream="perserve_super_experts")
    preserve_outliers: bool = setting(False, "never remove super experts of any layer",
                                      upstream="perserve_outliers")
    device: str = setting("auto", "where weights are loaded when they must be (auto | cpu | cuda | cuda:N)",
                          cli="--device", dropin="device", volatile=True)
    dtype: str = setting("auto", "dtype of the saved weights (auto: the checkpoint's own)", cli="--dtype",
                         dropin="dtype", choices=DTYPE_CHOICES)
    overwrite: bool = setting(False, "replace a model reap-fast saved in --output before", cli="--overwrite", run=(),
                              volatile=True)

    def __post_init__(self) -> None:
        ratio, count = self.compression_ratio, self.n_experts_to_prune
        owner = "PruneConfig"
        if ratio is not None and count is not None:
            raise SelectionError("give either {0} or {1}, not both", "compression_ratio", "n_experts_to_prune",
                                 owner=owner)
        if ratio is None and count is None:
            object.__setattr__(self, "compression_ratio", DEFAULT_COMPRESSION_RATIO)
        elif ratio is not None and not 0.0 < float(ratio) < 1.0:  # its own words: scripts match "outside (0, 1)"
            raise SelectionError(
                f"{{0}}={ratio} is outside (0, 1): it is the fraction of experts removed", "compression_ratio",
                owner=owner)
        validate(self, SelectionError)
        if self.preserve_super_experts and self.preserve_outliers:
            raise SelectionError("only one of {0} or {1} can be set", "preserve_super_experts", "preserve_outliers",
                                 owner=owner)
