"""Upstream REAP's ``prune.py`` / ``layerwise_prune.py`` run on reap-fast's observe and prune stages.

The same command line gives upstream's calibration set (``build_upstream_calibration``), upstream's
definition of g (:mod:`.semantics`), the observation file and pruned folder where upstream puts them
(:mod:`.layout`). Where upstream would crash or act on the wrong layer, one line names what the drop-in
does instead. Observation is :func:`reap_fast.observe.observe_checkpoint` (layer streaming for
``layerwise_prune``, resumable), pruning is :func:`reap_fast.prune.prune_checkpoint`.

An existing observation file is reused (after its keys are validated and checked against the model)
unless ``--overwrite_observations``; an existing pruned model is left alone (upstream skips the step)
unless ``--overwrite_pruned_model``. ``--run_observer_only`` stops after the observation is saved.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import sys
from pathlib import Path
from typing import Any, Sequence

import torch

from ..config import ConfigError, ObserveConfig, PruneConfig
from ..data import CalibrationSet, PackingOptions, build_calibration_set
from ..errors import EXIT_INTERRUPTED, ReapFastError
from ..logs import configure_logging, quiet_libraries
from ..outputs import LOCATION_ERRNOS, describe_os_error
from .args import (
    YAML_SECTIONS,
    ClusterArgs,
    CliError,
    DatasetArgs,
    ModelArgs,
    ObserverArgs,
    PruneArgs,
    ReapArgs,
    ReapFastArgs,
    parse_args,
    spell,
    stage_config,
)
from .evaluation import check_evaluation, evaluate_pruned
from .layout import is_composite, observation_path, pruned_model_name, results_directory
from .semantics import (
    family_note,
    observer_renormalize,
    super_expert_layer_note,
    super_experts_apply,
)

logger = logging.getLogger("reap_fast.upstream")

_UNBOUNDED_LENGTH = 1_000_000  # tokenizers without a real limit report ~1e30


def build_upstream_calibration(
    tokenizer: Any, ds_args: DatasetArgs, obs_args: ObserverArgs, seed: int, extra: ReapFastArgs
) -> CalibrationSet:
    """Upstream's calibration set: ``batches_per_category`` batches of ``batch_size`` packed sequences per
    category (``:N`` batches for a composite entry), ``--split`` for entries without ``(split)``,
    ``--dataset_config_name`` for a plain name."""
    max_length = obs_args.model_max_length
    if max_length is None:
        max_length = tokenizer.model_max_length
        if max_length >= _UNBOUNDED_LENGTH:
            raise CliError("the tokenizer names no model_max_length; pass --model_max_length")
    options = PackingOptions(
        separator=extra.packing_separator,
        allow_fewer=not extra.strict_samples,
        dedupe_bos=extra.dedupe_bos,
        truncate=obs_args.truncate,
        sequences_per_count=obs_args.batch_size,
        default_split=ds_args.split,
        default_subset=None if is_composite(ds_args.dataset_name) else ds_args.dataset_config_name,
    )
    return build_calibration_set(
        ds_args.dataset_name,
        tokenizer,
        samples_per_category=obs_args.batches_per_category,
        model_max_length=max_length,
        seed=seed,
        options=options,
    )


def yaml_args(parsed: dict[str, object], layerwise: bool) -> dict[str, dict]:
    """The sections upstream ``dump_args_to_yaml`` writes, plus ``reap_fast_args``."""
    sections = {key: dataclasses.asdict(parsed[cls.__name__]) for key, cls in YAML_SECTIONS}
    if layerwise:
        sections["layerwise_args"] = dataclasses.asdict(parsed["LayerwiseArgs"])
    sections["reap_fast_args"] = dataclasses.asdict(parsed["ReapFastArgs"])
    return sections


def _note(line: str) -> None:
    """One line on stderr naming where the drop-in differs from upstream."""
    print(f"note: {line}", file=sys.stderr)


def _validate(parsed: dict[str, Any]) -> None:
    """Upstream's own rules that no stage config holds (the configs check their settings themselves)."""
    obs_args: ObserverArgs = parsed["ObserverArgs"]
    if obs_args.split_by_category or obs_args.select_only_categories:
        raise CliError("--split_by_category / --select_only_categories are not supported by reap-fast")
    if parsed["PruneArgs"].n_experts_to_prune is None and parsed["ClusterArgs"].compression_ratio is None:
        raise CliError("either --n_experts_to_prune or --compression_ratio must be set for pruning")


def pruning_settings(parsed: dict[str, Any]) -> PruneConfig:
    """The prune stage's settings from the drop-in's flags (``--n_experts_to_prune`` wins over
    ``--compression_ratio``, as upstream; the pruned folder is rewritten when the step runs)."""
    count = parsed["PruneArgs"].n_experts_to_prune
    ratio = parsed["ClusterArgs"].compression_ratio if count is None else None
    return stage_config(PruneConfig, parsed, compression_ratio=ratio, overwrite=True)


def observation_settings(parsed: dict[str, Any], config: Any, obs_path: Path, layerwise: bool) -> ObserveConfig:
    """The observe stage's settings from the drop-in's flags and upstream's rules (g renormalised as upstream's
    script does; checkpoints beside the observation file, resumed; a sequence longer than the model: a warning)."""
    obs_args: ObserverArgs = parsed["ObserverArgs"]
    renormalize = observer_renormalize(
        config, obs_args.renormalize_router_weights, layerwise, parsed["ReapFastArgs"].renormalize_rule
    )
    length = obs_args.model_max_length or ObserveConfig.model_max_length  # None: the tokenizer's, set when known
    return stage_config(
        ObserveConfig, parsed, model_max_length=length, renormalize=renormalize, layerwise=True if layerwise else "auto",
        resume=True, checkpoint_dir=f"{obs_path}.partial", allow_longer_than_model=True,
        merging_statistics=not obs_args.record_pruning_metrics_only,
    )


def _observe(parsed: dict[str, Any], settings: ObserveConfig, obs_path: Path, layerwise: bool) -> dict:
    """Build upstream's calibration set, observe the checkpoint with ``settings``, save the observation file."""
    from transformers import AutoTokenizer

    from ..observe.runner import observe_checkpoint

    model_name = parsed["ModelArgs"].model_name
    tokenizer = AutoTokenizer.from_pretrained(model_name)
    calibration = build_upstream_calibration(
        tokenizer, parsed["DatasetArgs"], parsed["ObserverArgs"], settings.seed, parsed["ReapFastArgs"]
    )
    settings = dataclasses.replace(settings, model_max_length=calibration.seq_len)
    if layerwise and settings.merging_statistics:
        _note(
            "upstream's layerwise_prune.py records only the nine pruning keys; the drop-in also records the five "
            "merging statistics, as prune.py (--record_pruning_metrics_only true for upstream's file)"
        )
    metrics = observe_checkpoint(model_name, calibration, obs_path, settings)
    logger.info("observation saved to %s", obs_path)
    return metrics


def _load_observation(obs_path: Path) -> dict:
    from ..metrics import MetricsFileError, load_metrics

    logger.info("reusing the observation file %s (--overwrite_observations to recompute)", obs_path)
    try:
        return load_metrics(obs_path)
    except MetricsFileError as exc:
        raise type(exc)(f"{exc}; pass --overwrite_observations to record a new one") from None


def _prune(parsed: dict[str, Any], pruning: PruneConfig, metrics: dict, obs_path: Path, pruned_dir: Path,
           layerwise: bool) -> None:
    """Prune with ``pruning``, whose super-expert flags count only where upstream's would."""
    from ..identity import ModelIdentityError
    from ..prune import MetricsMismatchError, prune_checkpoint

    preserve_super = pruning.preserve_super_experts
    preserve_outliers = pruning.preserve_outliers
    if preserve_super or preserve_outliers:
        flag = "--perserve_super_experts" if preserve_super else "--perserve_outliers"
        if not super_experts_apply(pruning.method, parsed["ReapFastArgs"].super_experts_all_methods):
            _note(
                f"{flag} changes nothing with --prune_method {pruning.method}, as upstream "
                "(--super_experts_all_methods protects them for every method)"
            )
            preserve_super = preserve_outliers = False
        elif (line := super_expert_layer_note(sorted(metrics))) is not None:
            _note(line)
    pruning = dataclasses.replace(
        pruning,
        preserve_super_experts=preserve_super,
        preserve_outliers=preserve_outliers,
    )
    metadata = {"source_model": parsed["ModelArgs"].model_name, "args": yaml_args(parsed, layerwise)}
    try:
        prune_checkpoint(parsed["ModelArgs"].model_name, obs_path, pruned_dir, pruning, metadata=metadata)
    except (MetricsMismatchError, ModelIdentityError) as exc:
        raise type(exc)(f"{exc}; pass --overwrite_observations to record a new one") from None
    if not layerwise:
        _note("reap_args.yaml is written (upstream's prune.py stops with a TypeError at that step)")


def run(argv: Sequence[str] | None = None, layerwise: bool = False) -> int:
    """Parse, observe (or reuse the observation), prune, save and evaluate, as upstream's ``main``."""
    from ..models import get_adapter, text_config
    from ..models.loading import load_config
    from ..prune import check_prune_budget, holds_model
    from ..prune.select import experts_to_prune

    parsed, ignored = parse_args(argv, layerwise)
    reap_args: ReapArgs = parsed["ReapArgs"]
    ds_args: DatasetArgs = parsed["DatasetArgs"]
    obs_args: ObserverArgs = parsed["ObserverArgs"]
    model_args: ModelArgs = parsed["ModelArgs"]
    prune_args: PruneArgs = parsed["PruneArgs"]
    extra: ReapFastArgs = parsed["ReapFastArgs"]
    if reap_args.debug:
        logging.getLogger("reap_fast").setLevel(logging.DEBUG)
    if ignored:
        logger.warning(
            "ignoring %s: reap-fast observes, prunes and runs lm-eval tasks; these upstream flags concern merging, "
            "clustering, vLLM prompts and servers, other evaluation suites or upstream internals",
            ", ".join(ignored),
        )
    _validate(parsed)
    pruning = pruning_settings(parsed)
    random.seed(reap_args.seed)  # as upstream's set_seed; the calibration sampler has its own seeded stream
    torch.manual_seed(reap_args.seed)

    results_dir = results_directory(extra.artifacts_dir, model_args.model_name, ds_args.dataset_name)
    obs_path = observation_path(results_dir, ds_args.dataset_name, obs_args.output_file_name, layerwise)
    logger.info("results directory: %s", results_dir)
    # The family, the settings and the budget are checked before any calibration work.
    config = load_config(model_args.model_name)
    observing = observation_settings(parsed, config, obs_path, layerwise)
    check_prune_budget(config, pruning)
    if reap_args.do_eval:  # unknown lm-eval tasks stop here, not after the observation
        check_evaluation(parsed["EvalArgs"], reap_args.seed, extra.device)
    if (line := family_note(config)) is not None:
        _note(line)

    reuse = obs_path.is_file() and (not obs_args.overwrite_observations or ds_args.dataset_name == "combined")
    if ds_args.dataset_name == "combined" and not reuse:
        raise CliError(f"combined dataset requested but no pre-recorded observation found at {obs_path}")
    metrics = _load_observation(obs_path) if reuse else _observe(parsed, observing, obs_path, layerwise)
    if reap_args.run_observer_only:
        logger.info("observer run completed; exiting since --run_observer_only is set")
        return 0

    total = int(metrics[min(metrics)]["expert_frequency"].shape[0])
    adapter = get_adapter(config)
    model_experts = int(getattr(text_config(config), adapter.num_experts_key))
    if total != model_experts:
        raise CliError(
            f"{obs_path}: metrics file of another model: expert counts differ ({total} in the file vs "
            f"{model_experts} in the model); pass --overwrite_observations to record a new one"
        )
    n_prune = experts_to_prune(total, pruning)
    renorm = bool(obs_args.renormalize_router_weights)
    name = pruned_model_name(prune_args, n_prune, total, reap_args.seed, renorm, layerwise)
    pruned_dir = results_dir / "pruned_models" / name
    if holds_model(pruned_dir) and not prune_args.overwrite_pruned_model:
        logger.info("pruned model %s already exists; skipping pruning (--overwrite_pruned_model to redo it)", pruned_dir)
    else:
        logger.info("pruning %d of %d experts per layer with %s", n_prune, total, prune_args.prune_method)
        # as upstream, a ratio becomes a count per layer (pruned_experts.json records that count)
        counted = dataclasses.replace(pruning, compression_ratio=None, n_experts_to_prune=n_prune)
        _prune(parsed, counted, metrics, obs_path, pruned_dir, layerwise)
        logger.info("pruned model saved to %s", pruned_dir)
    if reap_args.do_eval:
        evaluate_pruned(pruned_dir, parsed["EvalArgs"], reap_args.seed, extra.device)
    return 0


def main(argv: Sequence[str] | None = None, layerwise: bool = False) -> int:
    """Entry point: 0 on success, 1 on a user error (one line on stderr), 2 for bad flags (argparse).

    Every :class:`~reap_fast.errors.ReapFastError` is a user error here; the drop-in keeps exit status 1
    for them, as its scripts always have, and 130 after Ctrl-C.
    """
    configure_logging("%(asctime)s %(levelname)s %(name)s: %(message)s")
    quiet_libraries()
    prog = "reap_fast.layerwise_prune" if layerwise else "reap_fast.prune"
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return run(argv, layerwise)
    except ConfigError as exc:  # named by the flag the user typed (--batch_size or --batch-size)
        print(f"{prog}: error: {exc.spelled(lambda owner, name: spell(owner, name, argv))}", file=sys.stderr)
        return 1
    except ReapFastError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # the disk filling up or turning read-only: the place, not a bug
        if exc.errno not in LOCATION_ERRNOS:
            raise
        print(f"{prog}: error: {describe_os_error(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
