"""Upstream REAP's command-line arguments (``reap/args.py``), with upstream's names and defaults.

Parsed by ``transformers.HfArgumentParser`` as upstream does: ``--flag_name`` and ``--flag-name``,
booleans as ``--flag``, ``--flag true|false`` and ``--no_flag`` for those defaulting to true.
``ReapFastArgs`` adds reap-fast's own flags; each reap-fast behaviour that differs from upstream's is
a flag there whose default is upstream's behaviour.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import typing
from dataclasses import dataclass, field
from typing import Any, Sequence

from ..config import DEFAULT_MODEL_MAX_LENGTH, ObserveConfig, PruneConfig
from ..config.checks import DEFAULT_SEED
from ..config.declare import declared
from ..config.flags import typed_flags
from ..config.prune import METHOD_CHOICES
from ..data import DEFAULT_SAMPLES_PER_CATEGORY
from ..errors import ReapFastError

_METHOD_HELP = "Method to use for pruning experts (lowest scores are removed)."

@dataclass
class ReapArgs:
    seed: int = field(default=DEFAULT_SEED, metadata={"help": "Random seed for reproducibility."})
    debug: bool = field(default=False, metadata={"help": "Enable debug mode for more verbose output."})
    profile: bool = field(default=True, metadata={"help": "Ignored by reap-fast (upstream profiling pass)."})
    run_observer_only: bool = field(default=False, metadata={"help": "Only run the observer and save its data."})
    do_eval: bool = field(
        default=True, metadata={"help": "Run --lm_eval_tasks on the pruned model (one line says when lm-eval is missing)."}
    )
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
    batches_per_category: int = field(
        default=DEFAULT_SAMPLES_PER_CATEGORY,
        metadata={"help": "Calibration batches (of --batch_size packed sequences) per category."},
    )
    split_by_category: bool = field(default=False, metadata={"help": "Not supported by reap-fast (an error)."})
    select_only_categories: list[str] | str | None = field(
        default=None, metadata={"help": "Not supported by reap-fast (an error)."}
    )
    batch_size: int = field(default=8, metadata={"help": "Packed sequences per calibration batch."})
    model_max_length: int | None = field(default=DEFAULT_MODEL_MAX_LENGTH, metadata={"help": "Tokens per packed sequence."})
    return_vllm_tokens_prompt: bool = field(default=False, metadata={"help": "Ignored (vLLM prompts)."})
    truncate: bool = field(default=False, metadata={"help": "Cut each document to the tokenizer's model_max_length."})
    overwrite_observations: bool = field(default=False, metadata={"help": "Recompute an existing observation file."})
    distance_measure: str = field(
        default="angular", metadata={"choices": ["angular", "euclidean", "jsd", "cka", "cosine"], "help": "Ignored."}
    )
    output_file_name: str = field(default="observations_1024_cosine.pt", metadata={"help": "Observation file name."})
    record_pruning_metrics_only: bool = field(
        default=False,
        metadata={"help": "Record only the pruning metrics (false: also upstream's five merging statistics)."},
    )
    renormalize_router_weights: bool = field(
        default=True,
        metadata={"help": "Renormalize g over the top-k (prune: where config.norm_topk_prob is true; layerwise: always)."},
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
    prune_method: str = field(default="frequency", metadata={"help": _METHOD_HELP, "choices": list(METHOD_CHOICES)})
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
class DropInArgs:
    """The drop-in's own flags: each reap-fast behaviour that differs from upstream's, upstream's by default."""

    artifacts_dir: str = field(default="artifacts", metadata={"help": "Root of the results tree (upstream: ./artifacts)."})
    packing_separator: str = field(
        default="masked",
        metadata={
            "choices": ["masked", "eos"],
            "help": "Gap between packed documents: masked (token 0, attention 0, upstream) or eos (attended EOS, not counted).",
        },
    )
    dedupe_bos: bool = field(default=False, metadata={"help": "Do not add a BOS before a text that starts with one."})
    strict_samples: bool = field(
        default=False, metadata={"help": "Stop when the data cannot fill the batches asked for (upstream: warn, use fewer)."}
    )
    renormalize_rule: str = field(
        default="upstream",
        metadata={
            "choices": ["upstream", "model"],
            "help": "When --renormalize_router_weights applies: upstream (prune: config.norm_topk_prob; layerwise: "
            "always) or model (where the model renormalises its own top-k weights, as reap-fast observe).",
        },
    )
    super_experts_all_methods: bool = field(
        default=False,
        metadata={"help": "Protect super experts for every method (upstream: not for frequency, max_activations)."},
    )


STAGE_CONFIGS = (ObserveConfig, PruneConfig)  # the stages the drop-in runs


def generated_fields(configs: Sequence[type]) -> list[tuple[str, Any, Any]]:
    """``make_dataclass`` fields of every setting of ``configs`` declaring a drop-in flag (``dropin``): its name,
    type, default, help and choices as the stage config declares them (a name several stages declare: once)."""
    generated: dict[str, tuple[str, Any, Any]] = {}
    for config_type in configs:
        hints = typing.get_type_hints(config_type)
        for item, spec in declared(config_type):
            if spec.dropin is None or spec.dropin in generated:
                continue
            metadata: dict[str, Any] = {"help": spec.help}
            if (spec.flag_choices or spec.choices) is not None:
                metadata["choices"] = list(spec.flag_choices or spec.choices)
            generated[spec.dropin] = (spec.dropin, hints[item.name], field(default=item.default, metadata=metadata))
    return list(generated.values())


def reap_fast_args_class(configs: Sequence[type] = STAGE_CONFIGS) -> type:
    """``ReapFastArgs``: the drop-in's own flags plus the stage settings declared with a drop-in flag."""
    generated = dataclasses.make_dataclass("ReapFastArgs", generated_fields(configs), bases=(DropInArgs,))
    generated.__module__ = __name__
    return generated


ReapFastArgs = reap_fast_args_class()

# Upstream fields the drop-in reads itself; those feeding a stage setting (its ``upstream`` name) are added.
# Every other upstream field is accepted and ignored with one warning.
READ_BY_DROPIN = {
    "debug", "run_observer_only",
    "model_name",
    "dataset_name", "dataset_config_name", "split",
    "overwrite_observations", "output_file_name", "truncate",
    "split_by_category", "select_only_categories", "do_eval", "run_lm_eval", "lm_eval_tasks", "results_dir",
    "record_pruning_metrics_only", "renormalize_router_weights",
    "overwrite_pruned_model",
}
HONOURED = READ_BY_DROPIN | {spec.upstream for config in STAGE_CONFIGS for _, spec in declared(config) if spec.upstream}


YAML_SECTIONS = (
    ("reap_args", ReapArgs),
    ("ds_args", DatasetArgs),
    ("obs_args", ObserverArgs),
    ("model_args", ModelArgs),
    ("eval_args", EvalArgs),
    ("prune_args", PruneArgs),
    ("cluster_args", ClusterArgs),
)


class CliError(ReapFastError, ValueError):
    """A user error reported as one line with exit status 1."""


def _classes(layerwise: bool) -> list[type]:
    classes = [ReapArgs, DatasetArgs, ObserverArgs, ModelArgs, EvalArgs, PruneArgs, ClusterArgs]
    if layerwise:
        classes.append(LayerwiseArgs)
    return classes + [MergeArgs, ReapFastArgs]


def build_parser(layerwise: bool = False):
    """The upstream-compatible parser (``HfArgumentParser`` over upstream's argument dataclasses)."""
    from transformers import HfArgumentParser

    prog = "python -m reap_fast.layerwise_prune" if layerwise else "python -m reap_fast.prune"
    return HfArgumentParser(_classes(layerwise), prog=prog, description=__doc__.split("\n\n")[0])


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
        ignored_flags.extend(typed_flags(options, argv) or options[:1])  # options[:1]: an abbreviated flag
    return parsed, sorted(set(ignored_flags))


def _sources(config_type: type) -> dict[str, str]:
    """{field: the drop-in argument (upstream's or reap-fast's own) that sets it} of a stage config."""
    sources = {item.name: spec.upstream or spec.dropin for item, spec in declared(config_type)}
    return {name: source for name, source in sources.items() if source is not None}


def stage_config(config_type: type, parsed: dict[str, Any], **fixed: Any) -> Any:
    """``config_type`` from the drop-in's parsed arguments (each declared ``upstream``/``dropin`` name feeds its
    setting), plus ``fixed``: the settings the drop-in decides itself."""
    values = {name: value for args in parsed.values() for name, value in vars(args).items()}
    given = {name: values[source] for name, source in _sources(config_type).items() if source in values}
    return config_type(**{**given, **fixed})


def spell(config_name: str | None, name: str, argv: Sequence[str]) -> str | None:
    """The flag of a stage setting as the user typed it (``--batch_size`` or ``--batch-size``; None: no flag)."""
    sources = [_sources(config_type).get(name) for config_type in STAGE_CONFIGS
               if config_name in (None, config_type.__name__)]
    source = next((found for found in sources if found is not None), None)
    if source is None:
        return None
    spellings = ("--" + source, "--" + source.replace("_", "-"))
    return (typed_flags(spellings, argv) or spellings)[0]
