"""The identity of the model an observation file was recorded on, and the check before pruning with it.

reap-fast stores ``{"model", "model_type", "num_layers", "num_experts", "config_sha256", "weights_sha256"}``
under :data:`reap_fast.metrics.IDENTITY_KEY` in every layer's dictionary of the files it writes (upstream
REAP ignores keys it does not use); :func:`reap_fast.metrics.load_metrics` returns it as ``.identity``. A
file with the record is refused for a model whose family, layer count, expert count, architecture config
or weights differ (``weights_sha256``: a digest of the weight files' headers and of sampled blocks of
their data, cheap for any size; a model saved again in another dtype or sharding counts as other
weights). A file without the record (written by upstream REAP), or without ``weights_sha256`` (earlier
reap-fast versions), is accepted on what it records.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

from .errors import ReapFastError
from .metrics import LayerMetrics, Observation
from .models import get_adapter, text_config

logger = logging.getLogger(__name__)

# Config entries that change when the same model is saved again, not when it is another model.
_VOLATILE_CONFIG_KEYS = ("transformers_version", "_name_or_path", "torch_dtype", "dtype", "use_cache", "architectures")


class ModelIdentityError(ReapFastError, ValueError):
    """The observation file was recorded on another model than the one being pruned."""


def config_digest(config: Any) -> str:
    """SHA-256 of the model's config without the entries a re-save changes."""
    values = config.to_dict()
    for key in _VOLATILE_CONFIG_KEYS:
        values.pop(key, None)
    text = json.dumps(values, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


SAMPLED_BLOCKS = 16  # blocks of each weight file read for its digest
BLOCK_BYTES = 4096


def weights_digest(model_path: str | os.PathLike) -> str | None:
    """SHA-256 over each weight file's name, size, first 1 MiB (the safetensors header) and
    :data:`SAMPLED_BLOCKS` evenly spaced blocks of its data; None for a hub name or a folder without weights."""
    from .preflight import weight_files

    folder = Path(model_path).expanduser()
    if not folder.is_dir():
        return None
    files = weight_files(folder)
    if not files:
        return None
    digest = hashlib.sha256()
    for path in files:
        size = path.stat().st_size
        digest.update(f"{path.name}:{size}".encode())
        with open(path, "rb") as handle:
            digest.update(handle.read(1 << 20))
            for index in range(SAMPLED_BLOCKS):
                handle.seek(size * index // SAMPLED_BLOCKS)
                digest.update(handle.read(BLOCK_BYTES))
    return digest.hexdigest()


def model_identity(config: Any, model_path: str | os.PathLike) -> dict[str, Any]:
    """The identity record of a model (its path, family, layer and expert counts, config and weights digests)."""
    adapter = get_adapter(config)
    text = text_config(config)
    local = Path(model_path).expanduser()
    return {
        "model": str(local.resolve()) if local.exists() else str(model_path),
        "model_type": str(getattr(text, "model_type", getattr(config, "model_type", ""))),
        "num_layers": int(getattr(text, "num_hidden_layers")),
        "num_experts": int(getattr(text, adapter.num_experts_key)),
        "config_sha256": config_digest(config),
        "weights_sha256": weights_digest(model_path),
    }


def attach_identity(metrics: dict[int, LayerMetrics], identity: dict[str, Any]) -> Observation:
    """``metrics`` as an :class:`~reap_fast.metrics.Observation` that records ``identity`` when saved."""
    observation = Observation(metrics)
    observation.identity = dict(identity)
    return observation


def check_identity(metrics: dict[int, LayerMetrics], config: Any, model_path: str | os.PathLike, source: str) -> None:
    """Refuse ``metrics`` recorded on another model than ``config``'s (files without a record pass)."""
    recorded = getattr(metrics, "identity", None)
    if not recorded:
        return
    current = model_identity(config, model_path)
    for key, label in (("model_type", "model family"), ("num_layers", "layer count"), ("num_experts", "expert count"),
                       ("config_sha256", "config"), ("weights_sha256", "weights")):
        if key == "weights_sha256" and (recorded.get(key) is None or current[key] is None):
            continue  # an earlier version's file, or a hub model: nothing to compare
        if key in recorded and recorded[key] != current[key]:
            shown = "differ" if key == "weights_sha256" else "differs" if key == "config_sha256" else (
                f"{recorded[key]} in the file vs {current[key]} here")
            raise ModelIdentityError(
                f"{source} was observed on another model ({recorded.get('model', 'unknown')}): {label} {shown}; "
                "observe this model first"
            )
    if recorded.get("model") != current["model"]:
        logger.info("%s was observed on %s (same architecture as %s)", source, recorded.get("model"), current["model"])
