"""Drop-in command lines for upstream REAP's ``python -m reap.prune`` and ``python -m reap.layerwise_prune``.

The flags are upstream's (``reap/args.py``: ``ReapArgs``, ``DatasetArgs``, ``ObserverArgs``, ``ModelArgs``,
``EvalArgs``, ``PruneArgs``, ``ClusterArgs`` and, for layerwise, ``LayerwiseArgs``) with upstream's
defaults, parsed by ``transformers.HfArgumentParser`` as upstream does: ``--flag_name`` and
``--flag-name``, booleans as ``--flag``, ``--flag true|false`` and ``--no_flag`` for those defaulting to
true. Defaults worth knowing: ``--prune_method frequency`` and ``--compression_ratio 0.5`` (upstream's).

Flags for merging, clustering, evaluation and upstream internals (``--do_eval``, ``--smoke_test``,
``--distance_measure``, ``--cluster_method``, ``--merge_method``, ...) are accepted and ignored with one
warning that names them. Unknown flags stop with argparse's usage error (exit status 2).

reap-fast extras: ``--samples_per_category`` (alias of ``--batches_per_category``), ``--engine``
(auto: Triton on CUDA, else the reference engine), ``--device``, ``--dtype``, ``--global_ranking``,
``--min_experts_per_layer`` and ``--artifacts_dir`` (default ``artifacts``, upstream's ``./artifacts``).

Layout, as upstream ``create_results_directory`` / ``record_activations`` / ``get_pruned_model_dir``::

    <artifacts>/<model>/<dataset>/all/<output_file_name>                 observation (.pt)
    <artifacts>/<model>/<dataset>/layerwise/<output_file_name>           observation, layerwise, plain dataset
    <artifacts>/<model>/<dataset>/pruned_models/[layerwise_]<method>[-perserve_super|-perserve_outlier]
        [-renorm_true]-seed_<seed>-<n/E:.2f>/                            model, tokenizer, reap_args.yaml

``<model>`` is the last path component of ``--model_name`` and ``<dataset>`` that of ``--dataset_name``
(characters outside ``[\\w\\-_.]`` replaced by ``_``), or ``composite_<md5[:8]>`` for a spec with commas.
An existing observation file is reused (after its keys are validated and checked against the model)
unless ``--overwrite_observations``; an existing pruned model is left alone (upstream skips the step)
unless ``--overwrite_pruned_model``. ``--run_observer_only`` stops after the observation is saved.
``--record_pruning_metrics_only`` changes nothing: reap-fast always records only the pruning metrics.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import logging
import os
import random
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from ..errors import EXIT_INTERRUPTED, ReapFastError

logger = logging.getLogger("reap_fast.prune")

_METHOD_HELP = "Method to use for pruning experts (lowest scores are removed)."


@dataclass
class ReapArgs:
    seed: int = field(default=42, metadata={"help": "Random seed for reproducibility."})
    debug: bool = field(default=False, metadata={"help": "Enable debug mode for more verbose output."})
    profile: bool = field(default=True, metadata={"help": "Ignored by reap-fast (upstream profiling pass)."})
    run_observer_only: bool = field(default=False, metadata={"help": "Only run the observer and save its data."})
    do_eval: bool = field(default=True, metadata={"help": "Ignored by reap-fast (no evaluation)."})
    plot_clusters: bool = field(default=True, metadata={"help": "Ignored by reap-fast (no clustering)."})
    smoke_test: bool = field(default=True, metadata={"help": "Ignored by reap-fast."})


@dataclass
class ModelArgs:
    model_name: str = field(default="Qwen/Qwen3-30B-A3B", metadata={"help": "Model folder or hub name."})
    num_experts_per_tok_override: int | None = field(default=None, metadata={"help": "Ignored by reap-fast."})


@dataclass
class DatasetArgs:
    dataset_name: str = field(
        default="theblackcat102/evol-codealpaca-v1",
        metadata={"help": "Dataset name, local file/folder, or composite spec name[subset](split):N,..."},
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "Dataset subset (configuration)."})
    split: str = field(default="train", metadata={"help": "Dataset split to use."})
    shuffle: bool = field(default=True, metadata={"help": "Ignored by reap-fast (documents are drawn in seeded order)."})
    dataset_test_split: str = field(default="test", metadata={"help": "Ignored by reap-fast."})


@dataclass
class ObserverArgs:
    batches_per_category: int = field(default=1024, metadata={"help": "Calibration samples per category."})
    split_by_category: bool = False
    select_only_categories: list[str] | str | None = None
    batch_size: int = 1
    model_max_length: int | None = 2048
    return_vllm_tokens_prompt: bool = False
    truncate: bool = False
    overwrite_observations: bool = field(default=False, metadata={"help": "Recompute an existing observation file."})
    distance_measure: str = field(
        default="angular", metadata={"choices": ["angular", "euclidean", "jsd", "cka", "cosine"], "help": "Ignored."}
    )
    output_file_name: str = field(default="observations_1024_cosine.pt", metadata={"help": "Observation file name."})
    record_pruning_metrics_only: bool = field(
        default=False, metadata={"help": "Accepted; reap-fast always records only the pruning metrics."}
    )
    renormalize_router_weights: bool = field(
        default=True, metadata={"help": "Renormalize top-k router weights when the model itself does."}
    )


@dataclass
class ClusterArgs:
    cluster_description: str | None = None
    expert_sim: str = field(
        default="ttm",
        metadata={
            "choices": [
                "ttm",
                "dynamic_ttm",
                "characteristic_activation",
                "routed_characteristic_activation",
                "router_logits",
                "online_characteristic_activation_dist",
            ]
        },
    )
    compression_ratio: float | None = field(default=0.5, metadata={"help": "Fraction of experts removed per layer."})
    num_clusters: int | None = None
    cluster_method: str = field(default="agglomerative", metadata={"choices": ["agglomerative", "kmeans", "spectral", "mc_smoe"]})
    linkage_method: str = field(default="average", metadata={"choices": ["ward", "complete", "average", "single"]})
    frequency_penalty: bool = True
    softmax_temperature: float | None = None
    multi_layer: int | None = None
    max_cluster_size: int | None = None
    singleton_super_experts: bool = False
    singleton_outlier_experts: bool = False


@dataclass
class MergeArgs:
    overwrite_merged_model: bool = False
    merged_model_dir_name: str | None = None
    merge_method: str = "frequency_weighted_average"
    skip_first: bool = False
    skip_last: bool = False
    dom_as_base: bool = False
    select_top_k: float = 0.1
    permute: str | None = None
    save_as_tied_params: bool = False
    save_as_merged_model: bool = False


@dataclass
class EvalArgs:
    use_server: bool = True
    greedy: bool = True
    temperature: float = 0.7
    top_p: float = 0.8
    top_k: int = 20
    min_p: float = 0.0
    results_dir: str | None = None
    run_lm_eval: bool = True
    run_evalplus: bool = True
    run_livecodebench: bool = True
    run_wildbench: bool = False
    run_math: bool = False
    lm_eval_tasks: list[str] = field(
        default_factory=lambda: ["winogrande", "arc_challenge", "arc_easy", "boolq", "hellaswag", "mmlu", "openbookqa", "rte"]
    )
    evalplus_tasks: list[str] = field(default_factory=lambda: ["mbpp", "humaneval"])
    server_log_file_name: str = field(default_factory=lambda: os.environ.get("SERVER_LOG_FILE_NAME") or "server.log")
    vllm_port: int = 8000
    parallel_tasks: int = 32


@dataclass
class PruneArgs:
    overwrite_pruned_model: bool = field(default=False, metadata={"help": "Replace an existing pruned model."})
    prune_method: str = field(default="frequency", metadata={"help": _METHOD_HELP})  # choices set in build_parser
    n_experts_to_prune: int | None = field(default=None, metadata={"help": "Experts removed per layer (wins over ratio)."})
    perserve_super_experts: bool = field(
        default=False, metadata={"help": "Keep super experts (max activation outliers), except in the last quarter of the layers."}
    )
    perserve_outliers: bool = field(default=False, metadata={"help": "Keep max-activation outlier experts of all layers."})


@dataclass
class LayerwiseArgs:
    batch_group_size: int | None = None
    save_intermediate: bool = False
    low_cpu_mem_usage: bool = True


@dataclass
class ReapFastArgs:
    engine: str = field(
        default="auto", metadata={"choices": ["auto", "reference", "triton"], "help": "Observation engine (auto: triton on CUDA)."}
    )
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda, cuda:N."})
    dtype: str = field(default="auto", metadata={"help": "auto (the checkpoint's own dtype), bfloat16, float16, float32."})
    global_ranking: bool = field(default=False, metadata={"help": "Rank layer-normalized scores across layers."})
    min_experts_per_layer: int | None = field(default=None, metadata={"help": "Per-layer floor (default: top-k)."})
    artifacts_dir: str = field(default="artifacts", metadata={"help": "Root of the results tree (upstream: ./artifacts)."})


# Fields honoured by reap-fast; every other upstream field is accepted and ignored with one warning.
HONOURED = {
    "seed", "debug", "run_observer_only",
    "model_name",
    "dataset_name", "dataset_config_name", "split",
    "batches_per_category", "batch_size", "model_max_length", "overwrite_observations", "output_file_name",
    "record_pruning_metrics_only", "renormalize_router_weights",
    "compression_ratio",
    "overwrite_pruned_model", "prune_method", "n_experts_to_prune", "perserve_super_experts", "perserve_outliers",
}  # fmt: skip

YAML_SECTIONS = (
    ("reap_args", ReapArgs),
    ("ds_args", DatasetArgs),
    ("obs_args", ObserverArgs),
    ("model_args", ModelArgs),
    ("eval_args", EvalArgs),
    ("prune_args", PruneArgs),
    ("cluster_args", ClusterArgs),
)


class CliError(ReapFastError):
    """A user error reported as one line with exit status 1."""


def _classes(layerwise: bool) -> list[type]:
    classes = [ReapArgs, DatasetArgs, ObserverArgs, ModelArgs, EvalArgs, PruneArgs, ClusterArgs]
    if layerwise:
        classes.append(LayerwiseArgs)
    return classes + [MergeArgs, ReapFastArgs]


def build_parser(layerwise: bool = False):
    """The upstream-compatible parser (``HfArgumentParser`` over upstream's argument dataclasses)."""
    from transformers import HfArgumentParser

    from .scores import METHOD_CHOICES

    prog = "python -m reap_fast.layerwise_prune" if layerwise else "python -m reap_fast.prune"
    parser = HfArgumentParser(_classes(layerwise), prog=prog, description=__doc__.split("\n\n")[0])
    for action in parser._actions:
        if action.dest == "prune_method":
            action.choices = list(METHOD_CHOICES)
    parser.add_argument(
        "--samples_per_category",
        "--samples-per-category",
        dest="batches_per_category",
        type=int,
        default=argparse.SUPPRESS,
        help="reap-fast alias of --batches_per_category.",
    )
    return parser


def parse_args(argv: Sequence[str] | None = None, layerwise: bool = False):
    """Parse ``argv`` into upstream's dataclasses; returns (``{class name: instance}``, ignored flags given)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(layerwise)
    namespace = parser.parse_args(argv)  # unknown flags: argparse error, exit status 2
    # A second pass with every default suppressed tells which flags were actually written.
    explicit_parser = build_parser(layerwise)
    for action in explicit_parser._actions:
        if action.dest != "help":
            action.default = argparse.SUPPRESS
    given = vars(explicit_parser.parse_args(argv))
    values = vars(namespace)
    parsed = {}
    for cls in _classes(layerwise):
        names = {f.name for f in dataclasses.fields(cls) if f.init}
        parsed[cls.__name__] = cls(**{name: values[name] for name in names if name in values})
    reap_fast_fields = {f.name for f in dataclasses.fields(ReapFastArgs)}
    ignored = [name for name in given if name not in HONOURED and name not in reap_fast_fields]
    ignored_flags = []
    for dest in ignored:
        options = [opt for action in parser._actions if action.dest == dest for opt in action.option_strings]
        written = [opt for opt in options if any(arg == opt or arg.startswith(opt + "=") for arg in argv)]
        ignored_flags.extend(written or options[:1])  # options[:1]: an abbreviated flag
    return parsed, sorted(set(ignored_flags))


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


def calibration_spec(ds_args: DatasetArgs) -> str:
    """The dataset spec for reap-fast's loader; ``--dataset_config_name``/``--split`` apply to a plain name."""
    spec = ds_args.dataset_name
    plain = not any(ch in spec for ch in "[](),") and not is_composite(spec)
    if plain and ds_args.dataset_config_name:
        spec += f"[{ds_args.dataset_config_name}]"
    if plain and ds_args.split and ds_args.split != "train":
        spec += f"({ds_args.split})"
    return spec


def yaml_args(parsed: dict[str, object], layerwise: bool) -> dict[str, dict]:
    """The sections upstream ``dump_args_to_yaml`` writes, plus ``reap_fast_args``."""
    sections = {key: dataclasses.asdict(parsed[cls.__name__]) for key, cls in YAML_SECTIONS}
    if layerwise:
        sections["layerwise_args"] = dataclasses.asdict(parsed["LayerwiseArgs"])
    sections["reap_fast_args"] = dataclasses.asdict(parsed["ReapFastArgs"])
    return sections


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def run(argv: Sequence[str] | None = None, layerwise: bool = False) -> int:
    """Parse, observe (or reuse the observation), prune and save, as upstream ``prune.main``."""
    parsed, ignored = parse_args(argv, layerwise)
    reap_args: ReapArgs = parsed["ReapArgs"]
    ds_args: DatasetArgs = parsed["DatasetArgs"]
    obs_args: ObserverArgs = parsed["ObserverArgs"]
    model_args: ModelArgs = parsed["ModelArgs"]
    prune_args: PruneArgs = parsed["PruneArgs"]
    cluster_args: ClusterArgs = parsed["ClusterArgs"]
    extra: ReapFastArgs = parsed["ReapFastArgs"]
    if reap_args.debug:
        logging.getLogger("reap_fast").setLevel(logging.DEBUG)
    if ignored:
        logger.warning(
            "ignoring %s: reap-fast only observes and prunes; these upstream flags concern merging, clustering, "
            "evaluation or upstream internals",
            ", ".join(ignored),
        )
    if prune_args.perserve_super_experts and prune_args.perserve_outliers:
        raise CliError("only one of --perserve_super_experts or --perserve_outliers can be set")
    if obs_args.batch_size < 1:
        raise CliError(f"--batch_size must be at least 1, got {obs_args.batch_size}")
    if prune_args.n_experts_to_prune is None and cluster_args.compression_ratio is None:
        raise CliError("either --n_experts_to_prune or --compression_ratio must be set for pruning")
    if prune_args.n_experts_to_prune is None and not 0.0 < cluster_args.compression_ratio < 1.0:
        raise CliError(f"--compression_ratio {cluster_args.compression_ratio} is outside (0, 1)")
    _seed_everything(reap_args.seed)

    from transformers import AutoTokenizer

    from ..identity import ModelIdentityError, attach_identity, check_identity, model_identity
    from ..metrics import MetricsFileError, load_metrics, save_metrics
    from ..observe.runner import load_config, load_model, observe_checkpoint, run_observation
    from . import (
        MetricsMismatchError,
        check_metrics_match,
        check_prune_budget,
        holds_model,
        model_routing,
        prune_model,
        save_pruned,
    )
    from .select import experts_to_prune, select_experts

    results_dir = results_directory(extra.artifacts_dir, model_args.model_name, ds_args.dataset_name)
    obs_path = observation_path(results_dir, ds_args.dataset_name, obs_args.output_file_name, layerwise)
    logger.info("results directory: %s", results_dir)

    # The family and the budget are checked before any calibration work.
    ratio = cluster_args.compression_ratio if prune_args.n_experts_to_prune is None else None
    check_prune_budget(
        load_config(model_args.model_name), ratio, prune_args.n_experts_to_prune, extra.global_ranking,
        extra.min_experts_per_layer,
    )
    renorm = bool(obs_args.renormalize_router_weights)
    model = None

    reuse = obs_path.is_file() and (not obs_args.overwrite_observations or ds_args.dataset_name == "combined")
    if ds_args.dataset_name == "combined" and not reuse:
        raise CliError(f"combined dataset requested but no pre-recorded observation found at {obs_path}")
    if reuse:
        logger.info("reusing the observation file %s (--overwrite_observations to recompute)", obs_path)
        try:
            metrics = load_metrics(obs_path)
        except MetricsFileError as exc:
            raise CliError(f"{exc}; pass --overwrite_observations to record a new one") from None
    else:
        max_length = obs_args.model_max_length
        if max_length is None:
            tokenizer = AutoTokenizer.from_pretrained(model_args.model_name)
            max_length = tokenizer.model_max_length if tokenizer.model_max_length < 1_000_000 else 2048
        options = dict(
            samples_per_category=obs_args.batches_per_category,
            model_max_length=max_length,
            batch_size=obs_args.batch_size,
            seed=reap_args.seed,
            engine=extra.engine,
            renormalize=renorm,  # the Observer applies it only where the model renormalises, as upstream
        )
        if layerwise:  # stream one decoder layer at a time; the full model is loaded only for slicing
            metrics = observe_checkpoint(
                model_args.model_name, calibration_spec(ds_args), device=extra.device, dtype=extra.dtype,
                layerwise=True, resume=True, checkpoint_dir=f"{obs_path}.partial", **options,
            )
        else:
            model, tokenizer = load_model(model_args.model_name, device=extra.device, dtype=extra.dtype)
            metrics = run_observation(model, tokenizer, calibration_spec(ds_args), **options)
        identity = model_identity(load_config(model_args.model_name), model_args.model_name)
        save_metrics(attach_identity(metrics, identity), obs_path)
        logger.info("observation saved to %s", obs_path)
    if reap_args.run_observer_only:
        logger.info("observer run completed; exiting since --run_observer_only is set")
        return 0

    total_experts = int(metrics[min(metrics)]["expert_frequency"].shape[0])
    n_prune = experts_to_prune(total_experts, ratio, prune_args.n_experts_to_prune)
    pruned_dir = results_dir / "pruned_models" / pruned_model_name(
        prune_args, n_prune, total_experts, reap_args.seed, renorm, layerwise
    )
    if holds_model(pruned_dir) and not prune_args.overwrite_pruned_model:
        logger.info("pruned model %s already exists; skipping pruning (--overwrite_pruned_model to redo it)", pruned_dir)
        return 0
    if model is None:
        model, tokenizer = load_model(model_args.model_name, device=extra.device, dtype=extra.dtype)
    try:
        check_identity(metrics, load_config(model_args.model_name), model_args.model_name, str(obs_path))
        check_metrics_match(model, metrics, str(obs_path))
    except (MetricsMismatchError, ModelIdentityError) as exc:
        raise CliError(f"{exc}; pass --overwrite_observations to record a new one") from None
    routing = model_routing(model)
    keep = select_experts(
        metrics,
        method=prune_args.prune_method,
        n_experts_to_prune=n_prune,
        seed=reap_args.seed,
        global_ranking=extra.global_ranking,
        min_experts_per_layer=extra.min_experts_per_layer,
        preserve_super_experts=prune_args.perserve_super_experts,
        preserve_outliers=prune_args.perserve_outliers,
        top_k=routing["top_k"],
        groups=routing["groups"],
    )
    logger.info("pruning %d of %d experts per layer with %s", n_prune, total_experts, prune_args.prune_method)
    prune_model(model, keep)
    metadata = {
        "method": prune_args.prune_method,
        "compression_ratio": n_prune / total_experts,
        "n_experts_to_prune": n_prune,
        "seed": reap_args.seed,
        "source_model": model_args.model_name,
        "observation_file": str(obs_path),
        "args": yaml_args(parsed, layerwise),
    }
    save_pruned(model, tokenizer, pruned_dir, keep, metadata, overwrite=True, flag="--overwrite_pruned_model")
    logger.info("pruned model saved to %s", pruned_dir)
    return 0


def main(argv: Sequence[str] | None = None, layerwise: bool = False) -> int:
    """Entry point: returns 0 on success, 1 on a user error (one line on stderr); 2 for bad flags (argparse).

    Every :class:`~reap_fast.errors.ReapFastError` is a user error here; the drop-in keeps exit status 1
    for them, as its scripts always have, and 130 after Ctrl-C.
    """
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    prog = "reap_fast.layerwise_prune" if layerwise else "reap_fast.prune"
    try:
        return run(argv, layerwise)
    except ReapFastError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
