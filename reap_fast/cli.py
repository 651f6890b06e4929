"""The ``reap-fast`` command line: observe | prune | quantize | run | eval | demo."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from contextlib import nullcontext
from pathlib import Path

from .config import ObserveConfig, PruneConfig, QuantConfig
from .config.observe import DTYPE_CHOICES, ENGINE_CHOICES
from .config.quantize import QUANT_DTYPE_CHOICES
from .config.evaluate import EvalConfig, HarnessSettings
from .config.prune import DEFAULT_COMPRESSION_RATIO
from .children import sigterm_raises_system_exit
from .errors import EXIT_CANNOT_WRITE, EXIT_INTERRUPTED, ReapFastError, UsageError
from .logs import configure_logging, quiet_libraries
from .metrics import format_expert_table
from .outputs import (
    LOCATION_ERRNOS,
    OutputError,
    OutputLocationError,
    claim_output,
    clean_leftovers,
    describe_os_error,
    output_lock,
)
from .preflight import check_output_location

logger = logging.getLogger("reap_fast")

DESCRIPTION = (
    "REAP expert pruning of Mixture-of-Experts LLMs: observe (REAP statistics of a calibration set), "
    "prune (remove the lowest-scoring experts), quantize (AutoRound W4A16), run (all stages, resumable), "
    "eval (lm-eval tasks compared across models), demo (the built-in tiny model end to end)."
)


def parse_bool(text: str) -> bool:
    """'true'/'false' (and 1/0, yes/no) for flags written as upstream's HfArgumentParser accepts them."""
    lowered = text.strip().lower()
    if lowered in ("true", "1", "yes", "y"):
        return True
    if lowered in ("false", "0", "no", "n"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _add_observe_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = ObserveConfig
    parser.add_argument("--model", required=True, help="local Hugging Face folder (or hub name)")
    parser.add_argument("--dataset", required=True, help='calibration spec, e.g. "data.jsonl:64,name[subset](split):32"')
    parser.add_argument("--samples-per-category", type=int, default=defaults.samples_per_category,
                        help="samples per category without :N (default: 1024, upstream's)")
    parser.add_argument("--model-max-length", type=int, default=defaults.model_max_length,
                        help="tokens per packed sequence (at most the model's max_position_embeddings)")
    parser.add_argument("--allow-longer-than-model", action="store_true",
                        help="accept a --model-max-length above the model's max_position_embeddings (a warning)")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size, help="sequences per forward pass")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="seed of the calibration sampling")
    parser.add_argument("--device", default=defaults.device, help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--dtype", default=defaults.dtype, choices=DTYPE_CHOICES,
                        help="dtype the model is loaded in (auto: the checkpoint's own)")
    parser.add_argument("--renormalize-router-weights", type=parse_bool, default=defaults.renormalize,
                        metavar="{true,false}",
                        help="renormalise the router weights over the top-k where the model itself does")
    parser.add_argument("--engine", default=defaults.engine, choices=ENGINE_CHOICES,
                        help="observation engine (auto: triton on a GPU where it takes every MoE layer, else reference)")
    parser.add_argument("--layerwise", action="store_const", const=True, default=defaults.layerwise,
                        help="stream one decoder layer at a time from disk (default: when the model in memory "
                        "would not fit, by the memory plan)")
    parser.add_argument("--no-layerwise", dest="layerwise", action="store_const", const=False,
                        help="load the whole model (refused before loading when it cannot fit)")
    parser.add_argument("--merging-statistics", action="store_true",
                        help="also record upstream's five merging statistics (all experts on every token)")
    parser.add_argument("--checkpoint-every", type=float, default=defaults.checkpoint_every,
                        help="seconds between checkpoints")


def observe_config(args: argparse.Namespace, **settings) -> ObserveConfig:
    """The :class:`ObserveConfig` of the flags :func:`_add_observe_arguments` adds, plus ``settings``."""
    return ObserveConfig(
        samples_per_category=args.samples_per_category, model_max_length=args.model_max_length,
        batch_size=args.batch_size, seed=args.seed, engine=args.engine, renormalize=args.renormalize_router_weights,
        device=args.device, dtype=args.dtype, layerwise=args.layerwise, checkpoint_every=args.checkpoint_every,
        allow_longer_than_model=args.allow_longer_than_model, merging_statistics=args.merging_statistics,
        **settings,
    )  # fmt: skip


def _add_prune_arguments(parser: argparse.ArgumentParser) -> None:
    from .prune import METHOD_CHOICES

    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--compression-ratio", type=float, default=PruneConfig.compression_ratio,
                        help=f"fraction of experts removed per layer (default {DEFAULT_COMPRESSION_RATIO} without "
                        "--n-experts-to-prune)")
    budget.add_argument("--n-experts-to-prune", type=int, default=PruneConfig.n_experts_to_prune,
                        help="experts removed per layer")
    parser.add_argument("--method", default=PruneConfig.method, choices=sorted(METHOD_CHOICES), help="saliency score")
    parser.add_argument("--global", dest="global_ranking", action="store_true",
                        help="rank layer-normalised scores across layers (per-layer counts: refused for every "
                        "supported family, whose config holds one count)")
    parser.add_argument("--min-experts-per-layer", type=int, default=PruneConfig.min_experts_per_layer,
                        help="refuse a budget that leaves fewer experts per layer")
    parser.add_argument("--preserve-super-experts", action="store_true", help="never remove super experts")
    if not any(action.dest == "seed" for action in parser._actions):
        parser.add_argument("--seed", type=int, default=PruneConfig.seed, help="seed of the 'random' method")


def _prune_config(args: argparse.Namespace, **settings: object) -> PruneConfig:
    """The prune stage's settings from the flags of ``prune`` and ``run`` (``settings``: the rest)."""
    return PruneConfig(
        method=args.method, compression_ratio=args.compression_ratio, n_experts_to_prune=args.n_experts_to_prune,
        seed=args.seed, global_ranking=args.global_ranking, min_experts_per_layer=args.min_experts_per_layer,
        preserve_super_experts=args.preserve_super_experts, device=args.device, dtype=args.dtype, **settings,
    )


def _add_quantize_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--iters", type=int, default=QuantConfig.iters, help="AutoRound tuning iterations (0 = RTN)")
    parser.add_argument("--nsamples", type=int, default=None,
                        help=f"AutoRound calibration texts (default: {QuantConfig.nsamples}, or all the data holds when "
                        "fewer, with a warning)")
    parser.add_argument("--seqlen", type=int, default=QuantConfig.seqlen, help="AutoRound calibration length in tokens")


def _add_harness_arguments(parser: argparse.ArgumentParser, prefix: str) -> None:
    """lm-eval's options; ``prefix`` is "" for ``eval`` (lm-eval's spellings too) and "eval-" for ``run``."""

    def names(name: str) -> list[str]:
        spellings = [f"--{prefix}{name}"]
        if not prefix and "-" in name:
            spellings.append("--" + name.replace("-", "_"))
        return spellings

    parser.add_argument(*names("include-path"), dest="include_path", default=None,
                        help="folder of extra lm-eval task YAML files (lm-eval's --include_path)")
    parser.add_argument(*names("limit"), dest="limit", type=float, default=None,
                        help="examples per task (below 1: a fraction), as lm-eval's --limit")
    parser.add_argument(*names("num-fewshot"), dest="num_fewshot", type=int, default=None,
                        help="few-shot examples (default: each task's own)")
    parser.add_argument(*names("batch-size"), dest="harness_batch_size", default=HarnessSettings.batch_size,
                        metavar="BATCH_SIZE",
                        help="lm-eval batch size: an integer, auto or auto:N")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every flag's default in --help (flags without a help text get one: the tests require it)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default in (None, False, argparse.SUPPRESS) or "%(default)" in text or "default" in text:
            return text
        return f"{text} (default: %(default)s)"


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="reap-fast", description=DESCRIPTION, formatter_class=_HelpFormatter)
    parser.add_argument("--version", action="version", version=f"reap-fast {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_subparser_class())

    observe = commands.add_parser("observe", help="compute REAP statistics and save the observation .pt")
    _add_observe_arguments(observe)
    observe.add_argument("--output", required=True, help="observation file to write (.pt)")
    observe.add_argument("--resume", action="store_true", help="continue an interrupted observation")
    observe.add_argument("--checkpoint-dir", default=None, help="partial statistics (default: OUTPUT.partial)")
    observe.add_argument("--overwrite", action="store_true", help="replace an existing observation file")
    observe.add_argument("--top", type=int, default=3, help="experts shown per layer in the summary table (at least 1)")

    prune = commands.add_parser("prune", help="remove the lowest-scoring experts and save the smaller model")
    prune.add_argument("--model", required=True, help="the checkpoint the observation was made on")
    prune.add_argument("--metrics", required=True, help="observation .pt (reap-fast's or upstream REAP's)")
    prune.add_argument("--output", required=True, help="folder for the pruned model")
    _add_prune_arguments(prune)
    prune.add_argument("--device", default=PruneConfig.device,
                       help="where weights are loaded when they must be (auto | cpu | cuda | cuda:N)")
    prune.add_argument("--dtype", default=PruneConfig.dtype, choices=DTYPE_CHOICES,
                       help="dtype of the saved weights (auto: the checkpoint's own)")
    prune.add_argument("--overwrite", action="store_true", help="replace a model reap-fast saved in --output before")

    quantize = commands.add_parser("quantize", help="AutoRound W4A16 quantization of a (pruned) model")
    quantize.add_argument("--model", required=True, help="model folder to quantize")
    quantize.add_argument("--output", required=True, help="folder for the quantized model")
    quantize.add_argument("--dataset", required=True, help="calibration spec (local files work offline)")
    _add_quantize_arguments(quantize)
    quantize.add_argument("--batch-size", type=int, default=QuantConfig.batch_size, help="AutoRound batch size")
    quantize.add_argument("--seed", type=int, default=QuantConfig.seed, help="seed of sampling and AutoRound")
    quantize.add_argument("--device", default=QuantConfig.device, help="auto | cpu | cuda | cuda:N")
    quantize.add_argument("--dtype", default=QuantConfig.dtype, choices=QUANT_DTYPE_CHOICES,
                          help="dtype of the saved model's unquantized tensors and config (auto: the source's; "
                          "the group scales stay float16)")
    quantize.add_argument("--overwrite", action="store_true", help="replace a model reap-fast saved in --output before")

    run = commands.add_parser("run", help="observe -> prune -> [quantize] -> [eval], resumable")
    _add_observe_arguments(run)
    _add_prune_arguments(run)
    run.add_argument("--output", required=True, help="folder for every stage's outputs")
    run.add_argument("--quantize", choices=["w4a16"], default=None, help="quantize the pruned model")
    _add_quantize_arguments(run)
    run.add_argument("--quant-batch-size", type=int, default=QuantConfig.batch_size, help="AutoRound batch size")
    run.add_argument("--eval", action="store_true", help="perplexity of original, pruned and quantized models")
    run.add_argument("--eval-dataset", default=None, help="held-out text spec for --eval (implies --eval)")
    run.add_argument("--eval-samples", type=int, default=EvalConfig.samples,
                     help="held-out documents drawn from --eval-dataset (each cut to --eval-max-length tokens)")
    run.add_argument("--eval-max-length", type=int, default=EvalConfig.max_length, help="tokens per held-out sequence")
    run.add_argument("--eval-tasks", default=None,
                     help="lm-eval tasks (comma-separated) on the original, pruned and W4A16 models")
    _add_harness_arguments(run, "eval-")
    run.add_argument("--overwrite", action="store_true", help="start over in an --output holding another reap-fast run")

    evaluate = commands.add_parser("eval", help="lm-evaluation-harness tasks on one or more models, compared")
    evaluate.add_argument("--model", required=True, action="append",
                          help="model folder, or NAME=FOLDER; repeat it to compare (ratios are to the first)")
    evaluate.add_argument("--tasks", required=True, help="lm-eval tasks, comma-separated")
    _add_harness_arguments(evaluate, "")
    evaluate.add_argument("--seed", type=int, default=None, help="all of lm-eval's seeds (default: lm-eval's own)")
    evaluate.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    evaluate.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES,
                          help="dtype the models are loaded in (auto: each checkpoint's own)")
    evaluate.add_argument("--output", default=None, help="JSON file for the results (written atomically)")
    evaluate.add_argument("--overwrite", action="store_true", help="replace a results file reap-fast wrote before")

    demo = commands.add_parser("demo", help="run the pipeline end to end on the built-in tiny model")
    demo.add_argument("--output", default="demo_out", help="folder for the demo's files")
    return parser


def _subparser_class() -> type[argparse.ArgumentParser]:
    class Parser(argparse.ArgumentParser):
        def __init__(self, *args, **kwargs) -> None:
            kwargs.setdefault("formatter_class", _HelpFormatter)
            super().__init__(*args, **kwargs)

    return Parser


def cmd_observe(args: argparse.Namespace) -> int:
    from .metrics import looks_like_observation
    from .observe import observe_checkpoint
    from .observe.distributed import is_main_process

    if args.top < 1:
        raise UsageError(f"--top must be at least 1 (experts shown per layer), got {args.top}")
    output = Path(args.output)
    inputs = {"model folder": args.model}
    claim_output(args.output, "observation", inputs, args.overwrite, ours=looks_like_observation)
    checkpoint_dir = args.checkpoint_dir or f"{output}.partial"
    claim_output(checkpoint_dir, "checkpoint dir", {**inputs, "observation file": output})
    for written in (output, Path(checkpoint_dir) / "state.pt"):  # before the lock: one line, not a traceback
        check_output_location(written, 0)
    config = observe_config(args, resume=args.resume, checkpoint_dir=checkpoint_dir)
    with output_lock(output):
        clean_leftovers(output)
        claim_output(args.output, "observation", inputs, args.overwrite, ours=looks_like_observation)
        try:
            metrics = observe_checkpoint(args.model, args.dataset, output, config)
        except OSError as exc:
            if exc.errno not in LOCATION_ERRNOS:
                raise
            kept = Path(checkpoint_dir, "state.pt").is_file()
            resume = f"; the last checkpoint is kept in {checkpoint_dir}: free space and rerun with --resume"
            message = f"cannot write {exc.filename or output}: {describe_os_error(exc)}{resume if kept else ''}"
            raise OutputLocationError(message) from None
        if not is_main_process():
            return 0
    print(format_expert_table(metrics, args.top))
    print(f"saved {len(metrics)} layers of REAP statistics to {output}")
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    from .picture import check_picture, write_pruning_picture
    from .prune import prune_checkpoint

    inputs = {"model folder": args.model, "observation file": args.metrics}
    check_picture(args.output, inputs, args.overwrite)  # before the model is written, not after
    check_output_location(args.output, 0)
    folder = prune_checkpoint(args.model, args.metrics, args.output, _prune_config(args, overwrite=args.overwrite))
    print(f"pruned model saved to {folder}")
    picture = write_pruning_picture(args.metrics, folder, overwrite=args.overwrite)
    if picture is not None:
        print(f"picture of the pruning: {picture}")
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    from .quantize import check_model_dir, check_output_dir, quantize_w4a16, quantize_texts

    config = QuantConfig(
        iters=args.iters, nsamples=QuantConfig.nsamples if args.nsamples is None else args.nsamples, seqlen=args.seqlen,
        batch_size=args.batch_size, device=args.device, dtype=args.dtype, seed=args.seed, overwrite=args.overwrite,
    )  # fmt: skip
    check_model_dir(args.model)
    check_output_dir(args.output, overwrite=args.overwrite, model_dir=Path(args.model))  # before reading any data
    check_output_location(args.output, 0)
    texts, config = quantize_texts(args.model, args.dataset, config, explicit=args.nsamples is not None)
    folder = quantize_w4a16(args.model, args.output, texts, config)
    print(f"W4A16 model saved to {folder}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from .pipeline import Pipeline, PipelineConfig, PipelineError, format_summary

    if args.eval and not args.eval_dataset:
        raise PipelineError("--eval needs --eval-dataset: held-out text that calibration did not see")
    quantize = None
    if args.quantize:
        nsamples = QuantConfig.nsamples if args.nsamples is None else args.nsamples
        quantize = QuantConfig(iters=args.iters, nsamples=nsamples, seqlen=args.seqlen,
                               batch_size=args.quant_batch_size, device=args.device, seed=args.seed)
    evaluate = None
    if args.eval_dataset or args.eval_tasks:
        evaluate = EvalConfig(dataset=args.eval_dataset, samples=args.eval_samples, max_length=args.eval_max_length,
                              harness=_harness_settings(args, args.eval_tasks))
    config = PipelineConfig(args.model, args.dataset, args.output, observe_config(args), _prune_config(args),
                            quantize, evaluate, overwrite=args.overwrite)
    summary = Pipeline(config).run()
    print(format_summary(summary))
    return 0


def _harness_settings(args: argparse.Namespace, tasks: str | None):
    """lm-eval settings from the parsed flags (None without tasks)."""
    if tasks is None:
        return None
    return HarnessSettings(
        tasks=tasks, include_path=args.include_path, limit=args.limit, num_fewshot=args.num_fewshot,
        batch_size=args.harness_batch_size, seed=getattr(args, "seed", None) if args.command == "eval" else None,
        device=args.device, dtype=args.dtype,
    )


def _named_models(values: list[str]) -> list:
    """['a', 'pruned=b'] -> ModelEntry('a', 'a'), ModelEntry('pruned', 'b'); local folders are checked."""
    from .errors import UsageError
    from .evaluate import ModelEntry
    from .preflight import check_model_folder

    entries = []
    for value in values:
        name, _, path = value.partition("=") if "=" in value and not Path(value).exists() else ("", "", value)
        check_model_folder(path, need_tokenizer=True)
        entries.append(ModelEntry(name or Path(path).name, path))
    if len({entry.name for entry in entries}) < len(entries):
        raise UsageError("two --model entries have the same name; write them as NAME=FOLDER")
    return entries


def cmd_eval(args: argparse.Namespace) -> int:
    from .evaluate import Comparison, format_table, run_comparison
    from .evaluate.harness import check_tasks

    models = _named_models(args.model)
    if args.output is not None:  # before any evaluation: never a model's file, never a file of the user's
        inputs = {f"model folder {entry.name}": entry.path for entry in models}
        claim_output(args.output, "eval json", inputs, args.overwrite)
        check_output_location(args.output, 0)
    settings = _harness_settings(args, args.tasks)
    with output_lock(args.output) if args.output is not None else nullcontext():  # one process per results file
        check_tasks(settings)
        report = run_comparison(Comparison(models, settings), args.output, overwrite=args.overwrite)
    print(format_table(report["comparison"], [entry.name for entry in models]))
    if args.output:
        print(f"results written to {args.output}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(Path(args.output))
    return 0


COMMANDS = {
    "observe": cmd_observe,
    "prune": cmd_prune,
    "quantize": cmd_quantize,
    "run": cmd_run,
    "eval": cmd_eval,
    "demo": cmd_demo,
}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``reap-fast`` console script."""
    args = build_parser().parse_args(argv)
    configure_logging("%(message)s")
    quiet_libraries()
    debug = args.debug or bool(os.environ.get("REAP_FAST_DEBUG"))
    # SIGTERM unwinds like an exception, so locks are released and child processes stopped.
    restore_sigterm = sigterm_raises_system_exit()
    try:
        return COMMANDS[args.command](args)
    except ReapFastError as exc:
        if debug:
            raise
        print(f"reap-fast {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:  # the disk filling up, a file system turning read-only: the place, not a bug
        if debug or exc.errno not in LOCATION_ERRNOS:
            raise
        print(f"reap-fast {args.command}: error: {describe_os_error(exc)}", file=sys.stderr)
        return EXIT_CANNOT_WRITE
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"reap-fast {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        restore_sigterm()


if __name__ == "__main__":
    sys.exit(main())
