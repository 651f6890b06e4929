"""Write a pruned model: weights, config, tokenizer, ``pruned_experts.json`` and ``reap_args.yaml``.

When the model came unchanged but for the slicing from a local safetensors folder named by
``metadata["source_model"]`` (as ``prune_checkpoint`` and the drop-in CLI pass it), the folder is
written in that source's own layout by :mod:`.checkpoint` (its config keys, tokenizer files, tensor
names, dtypes and shards), so it loads wherever the source loads (transformers 4.55 and 5.x). Other models (built or trained in memory, ``.bin`` checkpoints) are written by
``save_pretrained`` of the installed transformers.

Everything is written into a temporary sibling folder (``.<name>.tmp-p<pid>-<random>``) that is renamed to the
output directory once complete, so an interrupted save never leaves a half-written model behind.

``pruned_experts.json``::

    {"method": "reap", "compression_ratio": 0.5, "n_experts_to_prune": 4,
     "layers": {"0": {"kept": [0, 2, ...], "removed": [1, 3, ...]}, ...}, ...other metadata}

``reap_args.yaml`` holds ``metadata["args"]`` when given (the CLI passes upstream's sections
``reap_args``, ``ds_args``, ``obs_args``, ``model_args``, ``eval_args``, ``prune_args``, ``cluster_args``,
as upstream ``dump_args_to_yaml`` writes them), else the rest of ``metadata``.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping

import torch
import yaml

from ..fileio import publish_folder
from ..preflight import TOKENIZER_FILES
from ..outputs import OutputError, claim_output, work_prefix, write_marker
from .checkpoint import PrunePlan, SourceLayoutError, source_checkpoint, write_source_layout
from .slicing import ORIGINAL_COUNTS_ATTRIBUTE

logger = logging.getLogger(__name__)

MODEL_FILE_PATTERNS = ("config.json", "*.safetensors", "model.safetensors.index.json", "pytorch_model*.bin")


OutputExistsError = OutputError  # the name this module exported before the shared output contract


def holds_model(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` already contains a saved model (config or weights)."""
    folder = Path(folder)
    return folder.is_dir() and any(any(folder.glob(pattern)) for pattern in MODEL_FILE_PATTERNS)


def _plain(value: Any) -> Any:
    """YAML/JSON-safe copy: paths to strings, tuples to lists, tensors to lists."""
    if isinstance(value, Mapping):
        return {str(k) if not isinstance(k, (int, str)) else k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, pathlib.PurePath):
        return str(value)
    if isinstance(value, torch.Tensor):
        return value.tolist()
    return value


def expert_report(keep: Mapping[int, torch.Tensor], original_counts: Mapping[int, int]) -> dict[str, dict[str, list[int]]]:
    """``{"layer": {"kept": [...], "removed": [...]}}`` for ``pruned_experts.json``."""
    report = {}
    for layer in sorted(keep):
        kept = sorted(int(i) for i in torch.as_tensor(keep[layer]).flatten().tolist())
        count = int(original_counts[layer])
        kept_set = set(kept)
        report[str(layer)] = {"kept": kept, "removed": [i for i in range(count) if i not in kept_set]}
    return report


def prepare_output_dir(
    output_dir: str | os.PathLike,
    overwrite: bool = False,
    inputs: Mapping[str, str | os.PathLike | None] | None = None,
    flag: str = "--overwrite",
) -> Path:
    """Check ``output_dir`` against the output rule (:func:`reap_fast.outputs.claim_output`); return it."""
    return claim_output(output_dir, "pruned folder", inputs, overwrite, flag)


def _weight_numel(model) -> int:
    """Elements of the model's saved state: unique parameters (tied ones once) and persistent buffers."""
    saved = set(model.state_dict(keep_vars=True))
    buffers = sum(buffer.numel() for name, buffer in model.named_buffers() if name in saved)
    return sum(param.numel() for param in model.parameters()) + buffers


def is_skeleton(model) -> bool:
    """Whether every weight of ``model`` is on the meta device (built by ``load_skeleton``: shapes only)."""
    return all(param.device.type == "meta" for param in model.parameters())


def _write_like_source(model, source: Path, staging: Path, keep: Mapping[int, torch.Tensor], original, dtype) -> None:
    """Write ``staging`` in the source's layout (``dtype``: a dtype name to cast the weights to, or None);
    :class:`SourceLayoutError` when the layout cannot be edited."""
    counts = set(int(count) for count in original.values())
    plan = PrunePlan(
        keep={int(layer): sorted(int(i) for i in torch.as_tensor(kept).flatten().tolist()) for layer, kept in keep.items()},
        original_count=counts.pop() if len(counts) == 1 else -1,
        dtype=None if dtype in (None, "auto") else str(dtype),
    )
    written = write_source_layout(source, staging, plan)
    expected = _weight_numel(model)
    if written != expected:
        raise SourceLayoutError(f"the source layout gave {written} weights, the pruned model holds {expected}")


def _write_model(model, tokenizer, source: Path | None, staging: Path, keep, original, dtype=None) -> None:
    """The weights, config and tokenizer: in the source's layout when possible, else by ``save_pretrained``."""
    if source is not None:
        try:
            _write_like_source(model, source, staging, keep, original, dtype)
            if tokenizer is not None and not any((staging / name).is_file() for name in TOKENIZER_FILES):
                tokenizer.save_pretrained(staging)
            return
        except SourceLayoutError as exc:
            if is_skeleton(model):
                raise
            logger.warning("cannot write %s in its own layout (%s); saving with transformers' save_pretrained", source, exc)
            for path in staging.iterdir():
                path.unlink()
    if is_skeleton(model):
        raise SourceLayoutError("a model without weights (meta device) can only be saved from a safetensors source")
    model.save_pretrained(staging)
    if tokenizer is not None:
        tokenizer.save_pretrained(staging)


def save_pruned(
    model,
    tokenizer,
    output_dir: str | os.PathLike,
    keep: Mapping[int, torch.Tensor],
    metadata: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    flag: str = "--overwrite",
) -> Path:
    """Save a model pruned by :func:`reap_fast.prune.prune_model` into ``output_dir`` (atomically).

    ``flag`` is the overwrite option the refusal names (the drop-in's is ``--overwrite_pruned_model``).
    """
    metadata = dict(metadata or {})
    output_dir = prepare_output_dir(output_dir, overwrite, flag=flag)
    original = metadata.pop("original_num_experts", None) or getattr(model, ORIGINAL_COUNTS_ATTRIBUTE, None)
    if original is None:
        raise ValueError("the original expert counts are unknown: prune with prune_model() or pass original_num_experts")
    if isinstance(original, int):
        original = {layer: original for layer in keep}
    args = metadata.pop("args", None)

    source = source_checkpoint(metadata.get("source_model"))
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=work_prefix(output_dir, "tmp"), dir=output_dir.parent))
    try:
        _write_model(model, tokenizer, source, staging, keep, original, metadata.get("dtype"))
        report = {**_plain(metadata), "layers": expert_report(keep, original)}
        with open(staging / "pruned_experts.json", "w", encoding="utf-8") as handle:
            json.dump(report, handle, indent=2)
            handle.write("\n")
        with open(staging / "reap_args.yaml", "w", encoding="utf-8") as handle:
            yaml.dump(_plain(args if args is not None else metadata), handle, default_flow_style=False)
        # "eval": where the drop-in's --do_eval writes lm-eval results, as upstream does (not the user's)
        write_marker(staging, "pruned", [entry.name for entry in staging.iterdir()] + ["eval"])
        publish_folder(staging, output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info("pruned model saved to %s", output_dir)
    return output_dir


