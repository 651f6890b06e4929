"""The ``reap-fast`` command line: observe | prune | quantize | run | demo."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import torch

from .metrics import LayerMetrics

logger = logging.getLogger("reap_fast")


def parse_bool(text: str) -> bool:
    """'true'/'false' (and 1/0, yes/no) for flags written as upstream's HfArgumentParser accepts them."""
    lowered = text.strip().lower()
    if lowered in ("true", "1", "yes", "y"):
        return True
    if lowered in ("false", "0", "no", "n"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _add_observe_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="local Hugging Face folder (or hub name)")
    parser.add_argument("--dataset", required=True, help='calibration spec, e.g. "data.jsonl:64,name[subset](split):32"')
    parser.add_argument("--samples-per-category", type=int, default=None, help="samples per category without :N")
    parser.add_argument("--model-max-length", type=int, default=2048, help="tokens per packed sequence")
    parser.add_argument("--batch-size", type=int, default=1, help="sequences per forward pass")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"])
    parser.add_argument("--renormalize-router-weights", type=parse_bool, default=True, metavar="{true,false}")
    parser.add_argument("--engine", default="auto", choices=["auto", "reference", "triton"])
    parser.add_argument("--layerwise", action="store_true", help="stream one decoder layer at a time from disk")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted observation")
    parser.add_argument("--checkpoint-dir", default=None, help="where partial statistics are checkpointed")
    parser.add_argument("--checkpoint-every", type=float, default=300.0, help="seconds between checkpoints")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="reap-fast", description=__doc__)
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    commands = parser.add_subparsers(dest="command", required=True)

    observe = commands.add_parser("observe", help="compute REAP statistics and save the observation .pt")
    _add_observe_arguments(observe)
    observe.add_argument("--output", required=True, help="observation file to write (.pt)")
    observe.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    observe.add_argument("--top", type=int, default=3, help="experts shown per layer in the summary table")

    demo = commands.add_parser("demo", help="run the pipeline end to end on the built-in tiny model")
    demo.add_argument("--output", default="demo_out", help="folder for the demo's files")
    return parser


def format_expert_table(metrics: dict[int, LayerMetrics], top: int = 3) -> str:
    """Per layer: the highest and lowest REAP-scoring experts with their routed-token counts."""
    lines = [f"{'layer':>5}  {'top experts (reap score, tokens)':<48}  bottom experts (reap score, tokens)"]
    for layer, values in sorted(metrics.items()):
        order = torch.argsort(values["reap"], descending=True, stable=True)
        freq = values["expert_frequency"]

        def describe(indices: torch.Tensor) -> str:
            return "  ".join(f"e{int(i)} ({float(values['reap'][i]):.3g}, {int(freq[i])})" for i in indices)

        lines.append(f"{layer:>5}  {describe(order[:top]):<48}  {describe(order[-top:].flip(0))}")
    return "\n".join(lines)


def cmd_observe(args: argparse.Namespace) -> int:
    from .metrics import save_metrics
    from .observe import observe_checkpoint
    from .observe.distributed import is_main_process

    output = Path(args.output)
    if output.exists() and not args.overwrite:
        raise FileExistsError(f"{output} already exists (use --overwrite to replace it)")
    metrics = observe_checkpoint(
        args.model,
        args.dataset,
        samples_per_category=args.samples_per_category,
        model_max_length=args.model_max_length,
        batch_size=args.batch_size,
        seed=args.seed,
        engine=args.engine,
        renormalize=args.renormalize_router_weights,
        device=args.device,
        dtype=args.dtype,
        layerwise=args.layerwise,
        resume=args.resume,
        checkpoint_dir=args.checkpoint_dir or f"{output}.partial",
        checkpoint_every=args.checkpoint_every,
    )
    if not is_main_process():
        return 0
    save_metrics(metrics, output)
    print(format_expert_table(metrics, args.top))
    print(f"saved {len(metrics)} layers of REAP statistics to {output}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(Path(args.output))
    return 0


COMMANDS = {"observe": cmd_observe, "demo": cmd_demo}


def user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean bad input: shown as one line, not a traceback."""
    from .observe import EngineUnavailableError

    return (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, EngineUnavailableError)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``reap-fast`` console script."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    try:
        return COMMANDS[args.command](args)
    except user_errors() as exc:
        if args.debug or os.environ.get("REAP_FAST_DEBUG"):
            raise
        print(f"reap-fast {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
