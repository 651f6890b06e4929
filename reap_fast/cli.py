"""The ``reap-fast`` command line: observe | prune | quantize | run | eval | demo."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from contextlib import nullcontext
from pathlib import Path

from .children import sigterm_raises_system_exit
from .config import ConfigError, EvalConfig, HarnessSettings, ObserveConfig, PruneConfig, QuantConfig
from .config.flags import SettingFlags
from .config.quantize import QUANT_SCHEMES
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
    _add_model_and_data(observe)
    observe.add_argument("--output", required=True, help="observation file to write (.pt)")
    observe.add_argument("--overwrite", action="store_true", help="replace an existing observation file")
    observe.add_argument("--top", type=int, default=3, help="experts shown per layer in the summary table (at least 1)")
    _settings(observe, "observe", ObserveConfig)

    prune = commands.add_parser("prune", help="remove the lowest-scoring experts and save the smaller model")
    prune.add_argument("--model", required=True, help="the checkpoint the observation was made on")
    prune.add_argument("--metrics", required=True, help="observation .pt (reap-fast's or upstream REAP's)")
    prune.add_argument("--output", required=True, help="folder for the pruned model")
    _settings(prune, "prune", PruneConfig)

    quantize = commands.add_parser("quantize", help="AutoRound W4A16 quantization of a (pruned) model")
    quantize.add_argument("--model", required=True, help="model folder to quantize")
    quantize.add_argument("--output", required=True, help="folder for the quantized model")
    quantize.add_argument("--dataset", required=True, help="calibration spec (local files work offline)")
    _settings(quantize, "quantize", QuantConfig)

    run = commands.add_parser("run", help="observe -> prune -> [quantize] -> [eval], resumable")
    _add_model_and_data(run)
    run.add_argument("--output", required=True, help="folder for every stage's outputs")
    run.add_argument("--quantize", choices=list(QUANT_SCHEMES), default=None, help="quantize the pruned model")
    run.add_argument("--eval", action="store_true", help="perplexity of original, pruned and quantized models")
    run.add_argument("--eval-tasks", default=None,
                     help="lm-eval tasks (comma-separated) on the original, pruned and W4A16 models")
    run.add_argument("--overwrite", action="store_true", help="start over in an --output holding another reap-fast run")
    _settings(run, "run", ObserveConfig, PruneConfig, QuantConfig, EvalConfig, HarnessSettings)

    evaluate = commands.add_parser("eval", help="lm-evaluation-harness tasks on one or more models, compared")
    evaluate.add_argument("--model", required=True, action="append",
                          help="model folder, or NAME=FOLDER; repeat it to compare (ratios are to the first)")
    evaluate.add_argument("--tasks", required=True, help="lm-eval tasks, comma-separated")
    evaluate.add_argument("--output", default=None, help="JSON file for the results (written atomically)")
    evaluate.add_argument("--overwrite", action="store_true", help="replace a results file reap-fast wrote before")
    _settings(evaluate, "eval", HarnessSettings)

    demo = commands.add_parser("demo", help="run the pipeline end to end on the built-in tiny model")
    demo.add_argument("--output", default="demo_out", help="folder for the demo's files")
    return parser


def _add_model_and_data(parser: argparse.ArgumentParser) -> None:
    """The model folder and calibration spec of observe and run."""
    parser.add_argument("--model", required=True, help="local Hugging Face folder (or hub name)")
    parser.add_argument("--dataset", required=True, help='calibration spec, e.g. "data.jsonl:64,name[subset](split):32"')


def _settings(parser: argparse.ArgumentParser, command: str, *configs: type) -> None:
    """The stage configs' own flags (generated from their declarations), kept for the command to build them."""
    parser.set_defaults(setting_flags=SettingFlags(parser, command, configs))


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
    checkpoint_dir = getattr(args, "checkpoint_dir", None) or f"{output}.partial"
    config = args.setting_flags.build(args, ObserveConfig, checkpoint_dir=checkpoint_dir)
    inputs = {"model folder": args.model}
    claim_output(args.output, "observation", inputs, args.overwrite, ours=looks_like_observation)
    claim_output(checkpoint_dir, "checkpoint dir", {**inputs, "observation file": output})
    for written in (output, Path(checkpoint_dir) / "state.pt"):  # before the lock: one line, not a traceback
        check_output_location(written, 0)
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

    config = args.setting_flags.build(args, PruneConfig)
    inputs = {"model folder": args.model, "observation file": args.metrics}
    check_picture(args.output, inputs, config.overwrite)  # before the model is written, not after
    check_output_location(args.output, 0)
    folder = prune_checkpoint(args.model, args.metrics, args.output, config)
    print(f"pruned model saved to {folder}")
    picture = write_pruning_picture(args.metrics, folder, overwrite=config.overwrite)
    if picture is not None:
        print(f"picture of the pruning: {picture}")
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    from .quantize import check_model_dir, check_output_dir, quantize_w4a16, quantize_texts

    config = args.setting_flags.build(args, QuantConfig)
    check_model_dir(args.model)
    check_output_dir(args.output, overwrite=config.overwrite, model_dir=Path(args.model))  # before reading any data
    check_output_location(args.output, 0)
    explicit = "nsamples" in args.setting_flags.given(args, QuantConfig)
    texts, config = quantize_texts(args.model, args.dataset, config, explicit=explicit)
    folder = quantize_w4a16(args.model, args.output, texts, config)
    print(f"W4A16 model saved to {folder}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from .pipeline import Pipeline, PipelineConfig, PipelineError, format_summary

    flags = args.setting_flags
    held_out = flags.given(args, EvalConfig).get("dataset")
    if args.eval and not held_out:
        raise PipelineError("--eval needs --eval-dataset: held-out text that calibration did not see")
    evaluate = None
    if held_out or args.eval_tasks:
        harness = flags.build(args, HarnessSettings, tasks=args.eval_tasks) if args.eval_tasks else None
        evaluate = flags.build(args, EvalConfig, harness=harness)
    quantize = flags.build(args, QuantConfig) if args.quantize else None
    config = PipelineConfig(args.model, args.dataset, args.output, flags.build(args, ObserveConfig),
                            flags.build(args, PruneConfig), quantize, evaluate, overwrite=args.overwrite)
    summary = Pipeline(config).run()
    print(format_summary(summary))
    return 0


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
    settings = args.setting_flags.build(args, HarnessSettings, tasks=args.tasks)
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


def _config_message(error: ConfigError, args: argparse.Namespace, argv: list[str]) -> str:
    """``error``'s message naming each setting by the flag the user typed (or could type) in this command."""
    flags = getattr(args, "setting_flags", None)
    return error.spelled(lambda owner, name: flags.spell(owner, name, argv)) if flags else str(error)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``reap-fast`` console script."""
    argv = sys.argv[1:] if argv is None else list(argv)
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
        message = _config_message(exc, args, argv) if isinstance(exc, ConfigError) else str(exc)
        print(f"reap-fast {args.command}: error: {message}", file=sys.stderr)
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
