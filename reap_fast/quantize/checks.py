"""Pre-flight checks of a quantization run: cheap (no AutoRound constructed, no weights loaded), each failing
with a one-line :class:`QuantizationError` before any long work starts."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..config.quantize import QuantConfig
from ..errors import ReapFastError
from ..outputs import claim_output
from ..preflight import check_model_folder

logger = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'reap-fast[quant]'"


class QuantizationError(ReapFastError, ValueError):
    """A problem with the inputs or settings of a quantization run (one-line message)."""


# Config attributes whose values are in-features of some quantized linear layer; used to name
# offending sizes in the group-size error.
_SIZE_ATTRIBUTES = (
    "hidden_size",
    "moe_intermediate_size",
    "intermediate_size",
    "shared_expert_intermediate_size",
    "head_dim",
    "kv_lora_rank",
    "q_lora_rank",
)


def auto_round_version() -> str:
    """The installed auto-round version; :class:`QuantizationError` when it is not installed."""
    if importlib.util.find_spec("auto_round") is None:
        raise QuantizationError(f"auto-round is not installed; install it with: {INSTALL_HINT}")
    try:
        return importlib.metadata.version("auto-round")
    except importlib.metadata.PackageNotFoundError:  # installed from source under another name
        import auto_round  # noqa: PLC0415 - importing does not patch anything, constructing does

        return str(getattr(auto_round, "__version__", "unknown"))


def check_model_dir(model_dir: str | os.PathLike) -> Path:
    """The model folder as a Path; error when it is missing, incomplete or corrupt, or has no tokenizer."""
    if not Path(model_dir).expanduser().exists():
        raise QuantizationError(
            f"model folder not found: {model_dir} (quantize reads a local folder; for a hub model, download it first, "
            "e.g. with huggingface_hub.snapshot_download)"
        )
    check_model_folder(str(Path(model_dir).expanduser()), need_tokenizer=True)
    return Path(model_dir).expanduser()


def check_output_dir(output_dir: str | os.PathLike, *, overwrite: bool = False, model_dir: Path | None = None) -> Path:
    """The output folder as a Path, checked against the output rule (:func:`reap_fast.outputs.claim_output`)."""
    return claim_output(output_dir, "quantized folder", {"model folder": model_dir}, overwrite)


def is_router_name(name: str) -> bool:
    """Whether a module name is a router or shared-expert gate (kept in 16 bit)."""
    return name.endswith(".mlp.gate") or name.endswith("shared_expert_gate") or name.endswith(".router")


def _quantizable_in_features(config: Any) -> dict[int, list[str]]:
    """in-feature size -> example layer names, for the linears AutoRound would quantize.

    Built on the meta device (no memory, no weights). Fused MoE expert tensors (3-D parameters,
    ``[experts, out, in]`` or ``[experts, in, out]``) contribute both of their matrix dimensions,
    which covers their in-features whichever layout the family uses.
    """
    import torch  # noqa: PLC0415
    from transformers import AutoModelForCausalLM  # noqa: PLC0415

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    text_config = getattr(config, "text_config", None) or config
    known = {getattr(text_config, a, None) for a in _SIZE_ATTRIBUTES if a != "head_dim"}
    sizes: dict[int, list[str]] = {}
    for name, module in model.named_modules():
        if ".layers." not in f".{name}." or is_router_name(name):
            continue
        if isinstance(module, torch.nn.Linear):
            sizes.setdefault(module.in_features, []).append(name)
        for pname, param in module.named_parameters(recurse=False):
            if param.dim() == 3:
                # [experts, out, in] or [experts, in, out]: keep the dims that are config sizes
                # (so a fused gate_up's 2 * intermediate is not mistaken for an in-feature).
                dims = [int(d) for d in param.shape[-2:]]
                for dim in [d for d in dims if d in known] or dims:
                    sizes.setdefault(dim, []).append(f"{name}.{pname}")
    return sizes


def check_group_size(config: Any, group_size: int) -> None:
    """Error when a quantized layer's in-features are not divisible by ``group_size``."""
    QuantConfig(group_size=group_size)  # the range check (positive or -1)
    if group_size == -1:
        return
    try:
        sizes = _quantizable_in_features(config)
    except Exception as error:  # an architecture transformers cannot build on meta: use the config
        logger.debug("meta model failed (%s); checking config sizes only", error)
        sizes = {}
    text_config = getattr(config, "text_config", None) or config
    for attr in _SIZE_ATTRIBUTES:
        value = getattr(text_config, attr, None)
        if attr == "intermediate_size" and sizes:
            continue  # only matters when a dense MLP exists, which the meta model already shows
        if attr == "head_dim":
            continue  # head_dim alone is not an in-feature (num_heads * head_dim is)
        if isinstance(value, int) and value > 0:
            sizes.setdefault(value, []).append(attr)
    bad = sorted(size for size in sizes if size % group_size)
    if not bad:
        return
    described = []
    for size in bad:
        attrs = [a for a in _SIZE_ATTRIBUTES if getattr(text_config, a, None) == size and a != "head_dim"]
        heads, head_dim = getattr(text_config, "num_attention_heads", None), getattr(text_config, "head_dim", None)
        if not attrs and isinstance(heads, int) and isinstance(head_dim, int) and heads * head_dim == size:
            attrs = ["num_attention_heads*head_dim"]
        label = "/".join(attrs) if attrs else "in_features"
        example = next((n for n in sizes[size] if "." in n), sizes[size][0])
        described.append(f"{label}={size} (e.g. {example})")
    raise QuantizationError(
        f"group_size {group_size} does not divide the in-features of quantized layers: {', '.join(described)}; "
        "this model cannot be quantized with that group size"
    )


def token_lengths(tokenizer: Any, texts: Sequence[str]) -> list[int]:
    """Token count of each text, as AutoRound tokenizes it (special tokens included)."""
    if not texts:
        return []
    encoded = tokenizer(list(texts))["input_ids"]
    return [len(ids) for ids in encoded]


def check_texts(
    tokenizer: Any, texts: Sequence[str], seqlen: int, *, nsamples: int, min_samples: int = 1
) -> int:
    """How many texts are at least ``seqlen`` tokens long; error when fewer than ``min_samples``.

    AutoRound silently drops calibration samples shorter than ``seqlen`` and exits the process when
    none remain, so this is checked up front with the model's own tokenizer.
    """
    if isinstance(texts, (str, bytes)) or not all(isinstance(t, str) for t in texts):
        raise QuantizationError("calibration texts must be a list of strings")
    if not texts:
        raise QuantizationError("no calibration texts given")
    if seqlen <= 0:
        raise QuantizationError(f"seqlen must be positive, got {seqlen}")
    lengths = token_lengths(tokenizer, texts)
    long_enough = sum(length >= seqlen for length in lengths)
    needed = max(1, min_samples)
    if long_enough < needed:
        ranked = sorted(lengths, reverse=True)
        fits = ranked[needed - 1] if len(ranked) >= needed else 0
        hint = f"use a smaller --seqlen (e.g. --seqlen {fits})" if fits > 0 else "use a smaller --seqlen"
        raise QuantizationError(
            f"only {long_enough} of {len(texts)} calibration texts are at least seqlen={seqlen} tokens long "
            f"(need {needed}; auto-round drops shorter ones, longest is {ranked[0]} tokens); "
            f"{hint} or give longer texts"
        )
    if long_enough < nsamples:
        logger.warning(
            "only %d calibration texts are at least %d tokens long (nsamples=%d); quantization uses %d samples",
            long_enough,
            seqlen,
            nsamples,
            long_enough,
        )
    return long_enough



def quantize_texts(
    model_dir: str | os.PathLike, spec: str, config: QuantConfig, explicit: bool = True
) -> tuple[list[str], QuantConfig]:
    """The calibration texts of ``spec`` for a quantization with ``config``, and the config to run with.

    With ``explicit`` False (``--nsamples`` not given) a calibration set smaller than the default takes all
    its documents, with one warning line; an explicit ``--nsamples`` the data cannot give is refused with a
    line naming the flag and what the data holds.
    """
    from dataclasses import replace  # noqa: PLC0415

    from transformers import AutoTokenizer  # noqa: PLC0415

    from ..data import CalibrationDataError, calibration_texts  # noqa: PLC0415

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    try:
        return calibration_texts(spec, tokenizer, config.nsamples, seed=config.seed), config
    except CalibrationDataError as error:
        found = re.search(r"has only (\d+) non-empty documents", str(error))
        if found is None:
            raise
        available = int(found.group(1))
        if explicit or available < 1:
            raise QuantizationError(f"{error}; pass --nsamples {available} or fewer, or give more data") from None
    logger.warning(
        "the calibration data holds %d documents, fewer than the default %d: quantizing with --nsamples %d",
        available, config.nsamples, available,
    )
    config = replace(config, nsamples=available)
    return calibration_texts(spec, tokenizer, config.nsamples, seed=config.seed), config
