"""The quantization stage's settings: what ``quantize_w4a16`` runs AutoRound with, each default and check once.

``reap-fast quantize``, ``reap-fast run --quantize w4a16`` and :func:`reap_fast.quantize.run_quantize_subprocess`
take their defaults from here. Whether the model's layer sizes divide by ``group_size`` and whether enough
calibration texts reach ``seqlen`` tokens is checked against the model by :mod:`reap_fast.quantize.checks`.
"""

from __future__ import annotations

from dataclasses import dataclass

from .checks import ConfigError, DEFAULT_SEED, check_choice, check_integer, check_range

BITS_CHOICES = (2, 3, 4, 8)  # what auto-round's integer weight schemes take
QUANT_DTYPE_CHOICES = ("auto", "bfloat16", "float16", "float32")  # auto: the source model's own dtype


@dataclass(frozen=True)
class QuantConfig:
    """Settings of one AutoRound weight-only quantization (W{bits}A16, ``auto_round`` format, GPTQ packing).

    * ``group_size``: input features per quantization scale; -1 is one scale per output row.
    * ``iters``: AutoRound tuning steps per block (0 = round to nearest, no tuning).
    * ``nsamples`` / ``seqlen``: calibration texts and their length in tokens (texts shorter than ``seqlen``
      are dropped by auto-round); ``min_samples``: refuse a run with fewer texts that long.
    * ``device``: auto, cpu, cuda or cuda:N (checked by :func:`reap_fast.devices.resolve_device`).
    * ``dtype``: the saved model's dtype (its config and every unquantized tensor: embeddings, norms, routers,
      attention); "auto" keeps the source's. The group scales stay float16 as auto-round packs them.
    * ``overwrite``: replace a model reap-fast saved in the output folder before.
    """

    bits: int = 4
    group_size: int = 128
    sym: bool = True
    iters: int = 200
    nsamples: int = 128
    seqlen: int = 512
    batch_size: int = 8
    device: str = "auto"
    dtype: str = "auto"
    seed: int = DEFAULT_SEED
    min_samples: int = 1
    overwrite: bool = False

    def __post_init__(self) -> None:
        for name in ("bits", "group_size", "iters", "nsamples", "seqlen", "batch_size", "seed", "min_samples"):
            check_integer(name, getattr(self, name))
        check_choice("bits", self.bits, BITS_CHOICES)
        if self.group_size != -1 and self.group_size < 1:
            raise ConfigError(f"group_size must be positive or -1, got {self.group_size}")
        check_choice("sym", self.sym, (True, False))
        check_choice("dtype", self.dtype, QUANT_DTYPE_CHOICES)
        check_range("iters", self.iters, 0)
        check_range("nsamples", self.nsamples, 1)
        check_range("seqlen", self.seqlen, 1)
        check_range("batch_size", self.batch_size, 1)
        check_range("min_samples", self.min_samples, 1)
