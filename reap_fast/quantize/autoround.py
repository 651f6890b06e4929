"""The quantization itself: :func:`quantize_w4a16` (pre-checks, AutoRound in a staging folder, verified output
with its marker, published in one rename) and :func:`_run_auto_round`, the one place AutoRound is constructed."""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from ..config.quantize import QuantConfig
from ..devices import resolve_device
from ..fileio import publish_folder, sha256_file
from ..logs import tame_logger
from ..outputs import OutputLock, clean_leftovers, work_prefix, write_marker
from ..memory import free_memory
from ..models.disk_estimate import written_bytes
from ..models.memory_plan import check_fits, whole_model_peak
from ..preflight import check_output_location, weights_bytes
from .checks import (
    QuantizationError,
    auto_round_version,
    check_group_size,
    check_model_dir,
    check_output_dir,
    check_texts,
    is_router_name,
)
from .output import MARKER_FILE, MARKER_FORMAT, verify_saved, weight_files

logger = logging.getLogger(__name__)

# The QuantConfig fields recorded in reap_fast_quant.json's "settings" (with the scheme, format and counts).
_MARKER_SETTINGS = ("bits", "group_size", "sym", "iters", "nsamples", "seqlen", "batch_size", "device", "seed")


def quantize_w4a16(
    model_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    texts: Sequence[str],
    config: QuantConfig | None = None,
) -> Path:
    """Quantize the checkpoint in ``model_dir`` to W4A16 with AutoRound and save it to ``output_dir``.

    Runs in *this* process: AutoRound patches transformers' MoE classes process-wide, so prefer
    :func:`run_quantize_subprocess` unless this process does nothing else with transformers.
    Saved with ``save_quantized(format="auto_round")`` (GPTQ-compatible ``auto_round:auto_gptq``
    packing), routers and shared-expert gates in 16 bit, the tokenizer alongside, and
    ``reap_fast_quant.json``. The folder appears at ``output_dir`` only once complete.
    Settings: ``config`` (default: :class:`~reap_fast.config.QuantConfig`'s defaults).
    """
    config = QuantConfig() if config is None else config
    with OutputLock(output_dir):  # one process per output; leftovers of killed runs go first
        clean_leftovers(output_dir)
        version = auto_round_version()
        model_path = check_model_dir(model_dir)
        out = check_output_dir(output_dir, overwrite=config.overwrite, model_dir=model_path)
        config = replace(config, device=resolve_device(config.device))

        from transformers import AutoConfig, AutoTokenizer  # noqa: PLC0415

        check_group_size(AutoConfig.from_pretrained(model_path), config.group_size)
        try:
            tokenizer = AutoTokenizer.from_pretrained(model_path)
        except Exception as error:
            raise QuantizationError(f"cannot load the tokenizer from {model_path}: {error}") from error
        usable = check_texts(tokenizer, texts, config.seqlen, nsamples=config.nsamples, min_samples=config.min_samples)

        out.parent.mkdir(parents=True, exist_ok=True)
        estimate = written_bytes(model_path, quantization=(config.bits, config.group_size))
        check_output_location(out, weights_bytes(model_path) // 2 if estimate is None else estimate)
        check_fits(whole_model_peak(model_path, None), free_memory("cpu"), "AutoRound (the whole model on the host)")
        staging = Path(tempfile.mkdtemp(prefix=work_prefix(out, "partial"), dir=out.parent))
        workspace = Path(tempfile.mkdtemp(prefix=work_prefix(out, "ar-work"), dir=out.parent))
        previous_workspace = os.environ.get("AR_WORK_SPACE")
        os.environ["AR_WORK_SPACE"] = str(workspace)
        try:
            routers = _run_auto_round(model_path, staging, tokenizer, list(texts), config=config)
            tokenizer.save_pretrained(staging)
            qcfg = verify_saved(staging, bits=config.bits, group_size=config.group_size, sym=config.sym, routers=routers)
            marker = {
                "format": MARKER_FORMAT,
                "complete": True,
                "tool": "reap-fast quantize",
                "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                "source_model": str(model_path.resolve()),
                "auto_round_version": version,
                "transformers_version": importlib.metadata.version("transformers"),
                "torch_version": importlib.metadata.version("torch"),
                "settings": {
                    "scheme": f"W{config.bits}A16",
                    **{name: getattr(config, name) for name in _MARKER_SETTINGS},
                    "format": "auto_round",
                    "packing_format": qcfg.get("packing_format"),
                    "calibration_texts": len(texts),
                    "calibration_texts_used": min(usable, config.nsamples),
                },
                "unquantized_routers": sorted(routers),
                "weight_files": {p.name: sha256_file(p) for p in weight_files(staging)},
            }
            (staging / MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n")
            write_marker(staging, "w4a16")
            publish_folder(staging, out)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        finally:
            shutil.rmtree(workspace, ignore_errors=True)
            if previous_workspace is None:
                os.environ.pop("AR_WORK_SPACE", None)
            else:
                os.environ["AR_WORK_SPACE"] = previous_workspace
        logger.info("quantized model written to %s", out)
        return out


def _run_auto_round(model_path: Path, staging: Path, tokenizer: Any, texts: list[str], config: QuantConfig) -> list[str]:
    """Construct AutoRound, quantize, save into ``staging``; returns the router names kept 16 bit."""
    from auto_round import AutoRound  # noqa: PLC0415
    from transformers import AutoModelForCausalLM  # noqa: PLC0415

    tame_auto_round()
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype="auto")
    model.eval()
    source_dtype = str(model.dtype).removeprefix("torch.")  # AutoRound converts the model it is given
    blocks = getattr(model.config, "num_hidden_layers", "?")
    logger.info(
        "AutoRound: %s decoder blocks, %d tuning iterations each on %d texts of %d tokens (%s); "
        "the bar advances once per block", blocks, config.iters, config.nsamples, config.seqlen, config.device,
    )
    routers = [name for name, _ in model.named_modules() if is_router_name(name) and ".layers." in name]
    options: dict[str, Any] = {}
    if config.device == "cpu":
        options["enable_torch_compile"] = False
    rounder = AutoRound(
        model,
        tokenizer=tokenizer,
        scheme=f"W{config.bits}A16",
        bits=config.bits,
        group_size=config.group_size,
        sym=config.sym,
        iters=config.iters,
        nsamples=config.nsamples,
        seqlen=config.seqlen,
        batch_size=config.batch_size,
        dataset=texts,  # a local list: never downloads a calibration set
        device_map=config.device,
        seed=config.seed,
        ignore_layers=",".join(routers),
        **options,
    )
    rounder.quantize()
    rounder.save_quantized(str(staging), format="auto_round")
    dtype = source_dtype if config.dtype == "auto" else config.dtype
    cast_unquantized(staging, dtype)
    logger.info("W4A16: %d-bit weights, float16 group scales; routers and unquantized layers in %s (source: %s)",
                config.bits, dtype, source_dtype)
    return routers


QUANTIZED_SUFFIXES = (".qweight", ".qzeros", ".scales", ".g_idx")  # auto-round's packed tensors, kept as packed


def cast_unquantized(folder: Path, dtype: str) -> None:
    """Give every unquantized floating tensor of a saved folder, and its config, ``dtype``.

    auto-round picks the dtype it saves by the processor's features and restores some tensors to the source's
    (so a float32 source came back as a "bfloat16" config holding float32 tensors); this makes the folder what
    the user asked for. The shards are rewritten in place: ``folder`` is the staging folder, not yet published.
    """
    import torch  # noqa: PLC0415
    from safetensors import safe_open  # noqa: PLC0415
    from safetensors.torch import save_file  # noqa: PLC0415

    target = getattr(torch, dtype)
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as handle:
            metadata = handle.metadata()
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
        cast = {name: tensor.to(target) if tensor.is_floating_point() and not name.endswith(QUANTIZED_SUFFIXES)
                else tensor for name, tensor in tensors.items()}
        if any(cast[name].dtype != tensors[name].dtype for name in tensors):
            save_file(cast, str(shard), metadata=metadata)
    config_file = folder / "config.json"
    saved = json.loads(config_file.read_text())
    saved["dtype"] = dtype
    saved.pop("torch_dtype", None)
    config_file.write_text(json.dumps(saved, indent=2) + "\n")


class _OwnFolderNotice(logging.Filter):
    """auto-round warns that the folder it saves into "already exists, this may cause model conflict": the
    folder is reap-fast's empty staging folder, made for it."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "may cause model conflict" not in record.getMessage()


def tame_auto_round() -> None:
    """auto-round's logger through ours: warnings and errors only, no colour codes, no notice about our folder."""
    library = tame_logger("autoround", logging.WARNING)
    if not any(isinstance(item, _OwnFolderNotice) for item in library.filters):
        library.addFilter(_OwnFolderNotice())

