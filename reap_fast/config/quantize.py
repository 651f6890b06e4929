"""The quantization stage's settings: what ``quantize_w4a16`` runs AutoRound with, each default and check once.

``reap-fast quantize``, ``reap-fast run --quantize w4a16`` and :func:`reap_fast.quantize.run_quantize_subprocess`
take their defaults from here. Whether the model's layer sizes divide by ``group_size`` and whether enough
calibration texts reach ``seqlen`` tokens is checked against the model by :mod:`reap_fast.quantize.checks`.
"""

from __future__ import annotations

from dataclasses import dataclass

from .checks import ConfigError, DEFAULT_SEED
from .declare import setting, validate

QUANT_SCHEMES = ("w4a16",)  # reap-fast run --quantize
BITS_CHOICES = (2, 3, 4, 8)  # what auto-round's integer weight schemes take
QUANT_DTYPE_CHOICES = ("auto", "bfloat16", "float16", "float32")  # auto: the source model's own dtype


@dataclass(frozen=True)
class QuantConfig:
    """Settings of one AutoRound weight-only quantization (W{bits}A16, ``auto_round`` format, GPTQ packing).

    * ``group_size``: input features per quantization scale; -1 is one scale per output row.
    * ``iters``: AutoRound tuning steps per block (0 = round to nearest, no tuning).
    * ``nsamples`` / ``seqlen``: calibration texts and their length in tokens (texts shorter than ``seqlen``
      are dropped by auto-round); ``min_samples``: refuse a run with fewer texts that long. Where the data holds
      fewer documents, the default ``nsamples`` shrinks to what it holds (a warning); a value given is refused.
    * ``device``: auto, cpu, cuda or cuda:N (checked by :func:`reap_fast.devices.resolve_device`).
    * ``dtype``: the saved model's dtype (its config and every unquantized tensor: embeddings, norms, routers,
      attention); "auto" keeps the source's. The group scales stay float16 as auto-round packs them.
    * ``overwrite``: replace a model reap-fast saved in the output folder before.
    """

    bits: int = setting(4, "bits per weight", integer=True, choices=BITS_CHOICES)
    group_size: int = setting(128, "input features per quantization scale (-1: one per output row)", integer=True)
    sym: bool = setting(True, "symmetric quantization", choices=(True, False))
    iters: int = setting(200, "AutoRound tuning iterations (0 = round to nearest)", cli="--iters", integer=True,
                         low=0)
    nsamples: int = setting(128, "AutoRound calibration texts (fewer when the data holds fewer, with a warning)",
                            cli="--nsamples", integer=True, low=1)
    seqlen: int = setting(512, "AutoRound calibration length in tokens", cli="--seqlen", integer=True, low=1)
    batch_size: int = setting(8, "AutoRound batch size", cli="--batch-size", run="--quant-batch-size", integer=True,
                              low=1)
    device: str = setting("auto", "auto | cpu | cuda | cuda:N", cli="--device", volatile=True)
    dtype: str = setting("auto", "dtype of the saved model's unquantized tensors and config (auto: the source's; "
                         "the group scales stay float16)", cli="--dtype", choices=QUANT_DTYPE_CHOICES)
    seed: int = setting(DEFAULT_SEED, "seed of sampling and AutoRound", cli="--seed", integer=True)
    min_samples: int = setting(1, "refuse a run with fewer calibration texts of seqlen tokens", integer=True, low=1)
    overwrite: bool = setting(False, "replace a model reap-fast saved in --output before", cli="--overwrite", run=(),
                              volatile=True)

    def __post_init__(self) -> None:
        validate(self)
        if self.group_size != -1 and self.group_size < 1:
            raise ConfigError(f"{{0}} must be positive or -1, got {self.group_size}", "group_size", owner="QuantConfig")
