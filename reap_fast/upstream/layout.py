"""Where upstream REAP puts its outputs (``main.create_results_directory``, ``prune.get_pruned_model_dir``).

::

    <artifacts>/<model>/<dataset>/all/<output_file_name>                 observation (.pt)
    <artifacts>/<model>/<dataset>/layerwise/<output_file_name>           observation, layerwise, plain dataset
    <artifacts>/<model>/<dataset>/pruned_models/[layerwise_]<method>[-perserve_super|-perserve_outlier]
        [-renorm_true]-seed_<seed>-<n/E:.2f>/                            model, tokenizer, reap_args.yaml

``<model>`` is the last path component of ``--model_name`` and ``<dataset>`` that of ``--dataset_name``
(characters outside ``[\\w\\-_.]`` replaced by ``_``), or ``composite_<md5[:8]>`` for a spec with commas.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from .args import PruneArgs


def str_to_directory_name(text: str) -> str:
    """Upstream ``main.str_to_directory_name``: characters outside ``[\\w\\-_.]`` become ``_``."""
    return re.sub(r"[^\w\-_.]", "_", text)


def results_directory(artifacts_dir: str | os.PathLike, model_name: str, dataset_name: str) -> Path:
    """Upstream ``create_results_directory`` (without creating it): ``<artifacts>/<model>/<dataset>``."""
    model_clean = str_to_directory_name(str(model_name).rstrip("/").split("/")[-1])
    if "," in dataset_name:
        dataset_clean = "composite_" + hashlib.md5(dataset_name.encode()).hexdigest()[:8]
    else:
        dataset_clean = str_to_directory_name(dataset_name.rstrip("/").split("/")[-1])
    return Path(artifacts_dir) / model_clean / dataset_clean


_COMPOSITE = re.compile(r":\s*\d+\s*(?:,|$)")


def is_composite(dataset_name: str) -> bool:
    """Upstream ``parse_composite_dataset_spec`` is not None: some entry ends with ``:<count>``."""
    return bool(_COMPOSITE.search(dataset_name))


def observation_path(results_dir: Path, dataset_name: str, output_file_name: str, layerwise: bool) -> Path:
    """Where upstream keeps the observation file (``record_activations`` / ``_get_observer_output_path``)."""
    if layerwise and not (dataset_name == "combined" or is_composite(dataset_name)):
        return results_dir / "layerwise" / output_file_name
    return results_dir / "all" / output_file_name


def pruned_model_name(prune_args: PruneArgs, n_experts_to_prune: int, total_experts: int, seed: int, renorm: bool, layerwise: bool) -> str:
    """Upstream ``prune.get_pruned_model_dir``'s folder name."""
    name = ("layerwise_" if layerwise else "") + prune_args.prune_method
    if prune_args.perserve_super_experts:
        name += "-perserve_super"
    elif prune_args.perserve_outliers:
        name += "-perserve_outlier"
    if renorm:
        name += f"-renorm_{str(renorm).lower()}"
    return name + f"-seed_{seed}-{n_experts_to_prune / total_experts:.2f}"
