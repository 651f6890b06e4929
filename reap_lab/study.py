"""Quality study: does REAP keep the right experts? Held-out perplexity after pruning, by method.

``python -m reap_lab.study`` (the whole study, ``make study``) or ``python -m reap_lab.study --quick``
(one model, the four main methods, a few minutes; compared with the committed results).

1. The stdlib corpus (docstrings = ``docs``, sources = ``code``) is split *by document* into train
   (80%), calibration (10%) and eval (10%) parts, per category, with a fixed split seed.
2. ``--train-seeds`` study MoEs (Qwen3-MoE, 4 layers x 16 experts, top-2, byte tokenizer) are trained
   on the train part with :func:`reap_lab.train.train_tiny_moe` (seeds 0, 1, ...; deterministic
   algorithms, fixed threads), or reused from the work folder when a checkpoint with the same
   settings is there.
3. For every *calibration seed* (``--seeds``: 0, 1, ...) REAP statistics are observed with the
   reference engine on ``--calib-samples`` packed sequences per category drawn from the calibration
   part (the seed picks and orders the documents), and experts are pruned at every compression ratio
   by every method; the same seed is the seed of the ``random`` method's draw.
4. Every pruned model and the unpruned one are scored on the eval part (``--eval-rows`` packed rows
   per category) with :func:`reap_fast.evaluate.evaluate_rows`.
5. Statistics (:mod:`reap_lab.study_stats`): the trained model is the unit of replication; methods
   are compared paired, model by model, with t-intervals (:mod:`reap_lab.study_report` writes them).

Every finished evaluation is written at once to ``<work>/results/train<seed>.json``; a rerun with the
same settings resumes from there. Outputs in ``--output``: ``results.json``, ``results.md`` and
``quality.png``.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from reap_fast.evaluate import EvalRows, combine_results, evaluate_rows, pack_texts
from reap_fast.config.checks import ConfigError, check_range
from reap_fast.fileio import atomic_write_json
from reap_fast.logs import configure_logging
from .environment import environment_record
from .study_report import (
    RESULTS_FORMAT,
    check_reference,
    compare_with,
    comparison_markdown,
    results_markdown,
    summarize,
    write_outputs,
)
from .train import (
    TrainConfig,
    cap_rows,
    read_train_info,
    split_documents,
    stdlib_corpus,
    train_tiny_moe,
    use_eager_experts,
)

logger = logging.getLogger(__name__)

DEFAULT_METHODS = ("reap", "frequency", "ean_sum", "weighted_ean_sum", "max_activations", "random")
QUICK_METHODS = ("reap", "frequency", "weighted_ean_sum", "random")
DEFAULT_RATIOS = (0.25, 0.5)
COMMITTED_RESULTS = Path(__file__).resolve().parents[1] / "bench" / "quality" / "results.json"
# The study model is smaller than the demo's (hidden 64 instead of 128, same 4 layers x 16 experts, top-2) so
# that many models can be trained on a shared 2-core CPU; held-out reports during training use 16 rows.
STUDY_MODEL_OVERRIDES = dict(hidden_size=64, intermediate_size=128, moe_intermediate_size=64, num_attention_heads=2,
                             num_key_value_heads=1, head_dim=32)
STUDY_TRAIN_OPTIONS = {"config_overrides": STUDY_MODEL_OVERRIDES, "eval_max_rows": 16}


@dataclass(frozen=True)
class StudyConfig:
    """The settings of one study (validated on creation)."""

    train_seeds: int = 7
    first_train_seed: int = 0
    seeds: int = 2
    steps: int = 300
    methods: tuple[str, ...] = DEFAULT_METHODS
    ratios: tuple[float, ...] = DEFAULT_RATIOS
    seq_len: int = 256
    batch_size: int = 8
    calib_samples: int = 16
    eval_rows: int | None = 96
    threads: int = 1
    train_options: Mapping[str, Any] = field(default_factory=lambda: dict(STUDY_TRAIN_OPTIONS))
    retrain: bool = False

    def __post_init__(self) -> None:
        from reap_fast.prune.scores import known_methods

        for name in ("train_seeds", "seeds", "steps", "seq_len", "batch_size", "calib_samples", "threads", "eval_rows"):
            check_range(name, getattr(self, name), 1)  # eval_rows None: every eval row
        check_range("first_train_seed", self.first_train_seed, 0)
        unknown = sorted(set(self.methods) - set(known_methods()))
        if unknown or not self.methods:
            raise ConfigError(f"unknown or no methods: {unknown or 'none given'}; known: {', '.join(known_methods())}")
        if not self.ratios:
            raise ConfigError("no compression ratios given")
        for ratio in self.ratios:
            check_range("compression ratio", ratio, 0, 1, open_low=True, open_high=True)
        object.__setattr__(self, "methods", tuple(self.methods))
        object.__setattr__(self, "ratios", tuple(float(r) for r in self.ratios))
        self.train_config(self.first_train_seed)  # refuses bad train_options before any work

    def train_config(self, train_seed: int) -> TrainConfig:
        """How the model of ``train_seed`` is trained: this study's steps, seq_len and threads, then train_options."""
        settings = {"steps": self.steps, "seed": train_seed, "seq_len": self.seq_len, "threads": self.threads}
        clash = sorted(set(settings) & set(self.train_options))
        if clash:
            raise ConfigError(f"train_options may not set {', '.join(clash)}: the study's own settings say them")
        known = {item.name for item in fields(TrainConfig)}
        unknown = sorted(set(self.train_options) - known)
        if unknown:
            raise ConfigError(f"unknown TrainConfig setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return TrainConfig(**settings, **self.train_options)

    def train_seed_list(self) -> list[int]:
        return list(range(self.first_train_seed, self.first_train_seed + self.train_seeds))

    def model_fingerprint(self, train_seed: int, documents: Mapping[str, Mapping[str, int]]) -> dict[str, Any]:
        """Everything a model's stored evaluations depend on (a stored file with another one is redone)."""
        return {"format": RESULTS_FORMAT, "train_seed": train_seed, "steps": self.steps, "seq_len": self.seq_len,
                "batch_size": self.batch_size, "calib_samples": self.calib_samples, "eval_rows": self.eval_rows,
                "train_options": json.loads(json.dumps(dict(self.train_options), sort_keys=True)),
                "documents": documents}


# --- helpers -------------------------------------------------------------------------------------------


def _evaluate(model: Any, rows: Mapping[str, EvalRows], batch_size: int) -> dict[str, Any]:
    return combine_results({category: evaluate_rows(model, r, batch_size) for category, r in rows.items()})


def removed_traffic_share(metrics: Mapping[int, Mapping[str, torch.Tensor]], keep: Mapping[int, torch.Tensor]) -> float:
    """Share of the calibration's routed (token, expert) slots that went to removed experts, mean over layers."""
    shares = []
    for layer, kept in keep.items():
        frequency = metrics[layer]["expert_frequency"].double()
        total = float(frequency.sum())
        if total > 0:
            shares.append(1.0 - float(frequency[torch.as_tensor(kept, dtype=torch.long)].sum()) / total)
    return statistics.fmean(shares) if shares else float("nan")


def _run_key(seed: int, method: str, ratio: float) -> str:
    return f"{seed}/{method}/{ratio:g}"


class ModelRecord:
    """One trained model's stored results (``<work>/results/train<seed>.json``), written after every change."""

    def __init__(self, path: Path, fingerprint: Mapping[str, Any]):
        self.path = path
        stored = json.loads(path.read_text()) if path.is_file() else None
        if stored is not None and stored.get("fingerprint") == fingerprint:
            self.data = stored
        else:
            self.data = {"fingerprint": dict(fingerprint), "training": None, "baseline": None, "runs": {}}

    def run(self, seed: int, method: str, ratio: float) -> dict[str, Any] | None:
        return self.data["runs"].get(_run_key(seed, method, ratio))

    def add_run(self, run: Mapping[str, Any]) -> None:
        self.data["runs"][_run_key(run["seed"], run["method"], run["compression_ratio"])] = dict(run)
        self.save()

    def save(self) -> None:
        atomic_write_json(self.data, self.path)


# --- the study -------------------------------------------------------------------------------------------


class Study:
    """Trains (or reuses) the models, observes, prunes and scores; see the module docstring."""

    def __init__(self, config: StudyConfig, work_dir: str | os.PathLike,
                 documents: Mapping[str, Sequence[str]] | None = None):
        from .corpus import write_jsonl

        self.config = config
        self.work_dir = Path(work_dir)
        corpus = documents if documents is not None else stdlib_corpus()
        self.categories = sorted(corpus)
        self.splits = split_documents(corpus, seed=0)
        data_dir = self.work_dir / "data"
        self.calib_files = {c: write_jsonl(self.splits["calibration"][c], data_dir / f"calibration_{c}.jsonl")
                            for c in self.categories}
        self.document_counts = {s: {c: len(self.splits[s][c]) for c in self.categories} for s in self.splits}
        self.timings: dict[str, float] = {}

    def settings(self) -> dict[str, Any]:
        c = self.config
        return {
            "seeds": list(range(c.seeds)),
            "seed_meaning": "calibration sampling seed (which calibration documents are packed, and in which order) "
            "and the seed of the random method's draw",
            "train_seeds": c.train_seed_list(),
            "steps": c.steps,
            "methods": list(c.methods),
            "compression_ratios": list(c.ratios),
            "seq_len": c.seq_len,
            "batch_size": c.batch_size,
            "calibration_sequences_per_category": c.calib_samples,
            "eval_rows_per_category": c.eval_rows,
            "threads": c.threads,
            "engine": "reference",
            "split": "by document, per category, 80/10/10 train/calibration/eval, split seed 0",
            "documents": self.document_counts,
            "perplexity_rule": "exp(token-weighted mean NLL over every counted eval token (the first eval_rows packed "
            "rows of each category) that has a preceding real token; separators and padding are never targets)",
        }

    def _model(self, train_seed: int) -> tuple[Path, dict[str, Any]]:
        """The trained checkpoint of ``train_seed`` (trained now unless a matching one is stored)."""
        c = self.config
        model_dir = self.work_dir / f"model-seed{train_seed}-steps{c.steps}"
        wanted = {"seed": train_seed, "steps": c.steps, "seq_len": c.seq_len,
                  "train_documents": self.document_counts["train"], "deterministic_algorithms": True}
        wanted.update({k: v for k, v in c.train_options.items() if k in ("batch_size", "lr", "aux_loss_coef")})
        overrides = dict(c.train_options.get("config_overrides") or {})
        info = read_train_info(model_dir)
        reused = (not c.retrain and info is not None and all(info.get(k) == v for k, v in wanted.items())
                  and all(info.get("config", {}).get(k) == v for k, v in overrides.items()))
        if not reused:
            logger.info("training the study model (seed %d, %d steps) into %s", train_seed, c.steps, model_dir)
            train_tiny_moe(model_dir, c.train_config(train_seed), splits=self.splits)
            info = read_train_info(model_dir)
        return model_dir, {"reused_checkpoint": reused, "checkpoint": str(model_dir), **info}

    def study_model(self, train_seed: int) -> dict[str, Any]:
        """Train/reuse one model and evaluate every (calibration seed, ratio, method) not stored yet."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from reap_fast.data import build_calibration_set
        from reap_fast.metrics import save_metrics
        from reap_fast.observe import Observer
        from reap_fast.prune import PruneConfig, prune_model, select_experts

        c = self.config
        record = ModelRecord(self.work_dir / "results" / f"train{train_seed}.json",
                             c.model_fingerprint(train_seed, self.document_counts))
        clock = time.perf_counter()
        model_dir, training = self._model(train_seed)
        if record.data["training"] is None or not training["reused_checkpoint"]:
            record.data.update(training=training, baseline=None, runs={})
        record.data["training"]["reused_checkpoint"] = training["reused_checkpoint"]
        self.timings[f"train_seed{train_seed}_s"] = time.perf_counter() - clock
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        use_eager_experts(model)
        top_k = int(model.config.num_experts_per_tok)
        eval_rows = {cat: cap_rows(pack_texts(self.splits["eval"][cat], tokenizer, c.seq_len), c.eval_rows)
                     for cat in self.categories if self.splits["eval"][cat]}
        if record.data["baseline"] is None:
            clock = time.perf_counter()
            base = _evaluate(model, eval_rows, c.batch_size)
            base["seconds"] = time.perf_counter() - clock
            base.update(parameters=sum(p.numel() for p in model.parameters()),
                        num_experts=int(model.config.num_experts),
                        expert_parameters=sum(p.numel() for n, p in model.named_parameters() if ".mlp.experts." in n))
            record.data["baseline"] = base
            record.save()
        base = record.data["baseline"]
        logger.info("model %d unpruned: perplexity %.4f", train_seed, base["perplexity"])

        for seed in range(c.seeds):
            todo = [(r, m) for r in c.ratios for m in c.methods if record.run(seed, m, r) is None]
            observation = self.work_dir / "observations" / f"train{train_seed}-calib{seed}.pt"
            if not todo and observation.is_file():
                continue
            clock = time.perf_counter()
            spec = ",".join(f"{self.calib_files[cat]}:{c.calib_samples}" for cat in self.categories)
            calibration = build_calibration_set(spec, tokenizer, samples_per_category=c.calib_samples,
                                                model_max_length=c.seq_len, seed=seed)
            with Observer(model, engine="reference", renormalize=True) as observer:
                for batch in calibration.batches(c.batch_size):
                    observer.forward(batch.input_ids, batch.attention_mask, batch.stats_mask)
            metrics = observer.metrics()
            save_metrics(metrics, observation)
            for ratio, method in todo:
                keep = select_experts(metrics, PruneConfig(method=method, compression_ratio=ratio, seed=seed), top_k=top_k)
                run_clock = time.perf_counter()
                pruned = prune_model(copy.deepcopy(model), keep)
                score = _evaluate(pruned, eval_rows, c.batch_size)
                record.add_run({
                    "seconds": time.perf_counter() - run_clock,
                    "train_seed": train_seed, "seed": seed, "method": method, "compression_ratio": ratio,
                    "experts_kept": int(next(iter(keep.values())).numel()),
                    "parameters": sum(p.numel() for p in pruned.parameters()),
                    **score,
                    "perplexity_ratio": score["perplexity"] / base["perplexity"],
                    "kept": {str(layer): [int(i) for i in idx] for layer, idx in sorted(keep.items())},
                    "calibration_tokens": calibration.num_stat_tokens(),
                    "removed_traffic_share": removed_traffic_share(metrics, keep),
                })
                logger.info("model %d calib %d %-16s %.0f%%: perplexity %.4f", train_seed, seed, method, ratio * 100,
                            score["perplexity"])
                del pruned
            self.timings[f"observe_prune_eval_train{train_seed}_calib{seed}_s"] = time.perf_counter() - clock
        wanted = {_run_key(s, m, r) for s in range(c.seeds) for m in c.methods for r in c.ratios}
        runs = [run for key, run in record.data["runs"].items() if key in wanted]
        return {"training": record.data["training"], "baseline": base, "runs": runs, "model_dir": model_dir,
                "model": model, "tokenizer": tokenizer}

    def run(self, output_dir: str | os.PathLike, plot: bool = True) -> dict[str, Any]:
        """The whole study; writes ``results.json``, ``results.md`` and ``quality.png`` into ``output_dir``."""
        c = self.config
        if c.threads:
            torch.set_num_threads(c.threads)
        started = time.perf_counter()
        results: dict[str, Any] = {"format": RESULTS_FORMAT, "settings": self.settings(),
                                   "environment": environment_record(), "training": {}, "baseline": {}, "runs": []}
        for train_seed in c.train_seed_list():
            done = self.study_model(train_seed)
            info = done["training"]
            results["training"][str(train_seed)] = info
            results["baseline"][str(train_seed)] = done["baseline"]
            results["runs"].extend(done["runs"])
            del done
        results["summary"] = summarize(results)
        self.timings["total_s"] = time.perf_counter() - started
        results["timings"] = dict(self.timings)
        results["compute"] = _compute_seconds(results)
        write_outputs(results, output_dir, plot=plot)
        return results


def _compute_seconds(results: Mapping[str, Any]) -> dict[str, float]:
    """Compute this study's results represent: training (stored in each model) and the evaluations of this run."""
    training = sum(float(t.get("total_seconds", 0.0)) for t in results["training"].values())
    evaluation = sum(float(r.get("seconds", 0.0)) for r in results["runs"])
    evaluation += sum(float(b.get("seconds", 0.0)) for b in results["baseline"].values())
    return {"training_s": training, "evaluation_s": evaluation,
            "this_run_s": float(results["timings"].get("total_s", math.nan))}


def run_study(config: StudyConfig, output_dir: str | os.PathLike, work_dir: str | os.PathLike | None = None, *,
              documents: Mapping[str, Sequence[str]] | None = None, plot: bool = True) -> dict[str, Any]:
    """Run the study of ``config`` (``documents`` = ``{category: [texts]}`` replaces the stdlib corpus)."""
    work = Path(work_dir) if work_dir is not None else Path("artifacts") / "quality"
    return Study(config, work, documents).run(output_dir, plot=plot)


# --- command line ---------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    defaults = StudyConfig()
    parser = argparse.ArgumentParser(prog="python -m reap_lab.study", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help=f"one model (train seed 0), calibration seed 0, methods {' '.join(QUICK_METHODS)}; "
                        "output in artifacts/quality-quick, compared with the committed results")
    parser.add_argument("--output", default=None, help="where results.json/.md and quality.png go "
                        "(default bench/quality, with --quick artifacts/quality-quick)")
    parser.add_argument("--work", default=None, help="checkpoints, data splits, observations, per-model results "
                        "(default artifacts/quality, with --quick artifacts/quality-quick/work)")
    parser.add_argument("--seeds", type=int, default=None, help=f"calibration-sampling (and random-method) seeds "
                        f"(default {defaults.seeds}, quick 1)")
    parser.add_argument("--train-seeds", type=int, default=None,
                        help=f"independently trained models (default {defaults.train_seeds}, quick 1)")
    parser.add_argument("--train-seed-start", type=int, default=0,
                        help="first train seed (e.g. --quick --train-seed-start 100: a model the study never trained)")
    parser.add_argument("--steps", type=int, default=defaults.steps, help="training steps (batch 8 x 256 tokens)")
    parser.add_argument("--methods", nargs="+", default=None,
                        help=f"default: {' '.join(DEFAULT_METHODS)} (quick: {' '.join(QUICK_METHODS)})")
    parser.add_argument("--ratios", nargs="+", type=float, default=list(DEFAULT_RATIOS))
    parser.add_argument("--calib-samples", type=int, default=defaults.calib_samples,
                        help="packed calibration sequences per category")
    parser.add_argument("--eval-rows", type=int, default=defaults.eval_rows,
                        help="packed eval rows per category (0 = every eval document)")
    parser.add_argument("--seq-len", type=int, default=defaults.seq_len)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--retrain", action="store_true", help="train even when a matching checkpoint exists")
    parser.add_argument("--compare", default=None,
                        help="results.json to compare with (default with --quick: the committed bench/quality one)")
    parser.add_argument("--from-json", default=None, help="only rewrite results.md and quality.png from this "
                        "results.json (into --output), and compare it when --compare is given")
    parser.add_argument("--threads", type=int, default=defaults.threads,
                        help="torch threads for training and evaluation (fixed: part of what makes training reproducible)")
    return parser


def config_from_args(args: argparse.Namespace) -> StudyConfig:
    """The :class:`StudyConfig` of parsed command-line arguments (``--quick`` fills its own defaults)."""
    quick = args.quick
    return StudyConfig(
        train_seeds=args.train_seeds or 1 if quick else args.train_seeds or StudyConfig.train_seeds,
        first_train_seed=args.train_seed_start,
        seeds=args.seeds or 1 if quick else args.seeds or StudyConfig.seeds,
        steps=args.steps,
        methods=tuple(args.methods or (QUICK_METHODS if quick else DEFAULT_METHODS)),
        ratios=tuple(args.ratios),
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        calib_samples=args.calib_samples,
        eval_rows=args.eval_rows or None,
        threads=args.threads,
        retrain=args.retrain,
    )


def _read_reference(path: Path | None) -> dict[str, Any] | None:
    """The results.json to compare with, checked before any work starts (ValueError: one line for the user)."""
    if path is None:
        return None
    if not path.is_file():
        raise ValueError(f"no results to compare with at {path}")
    try:
        reference = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not JSON: {error}") from None
    check_reference(reference, path)
    return reference


def _compare(results: Mapping[str, Any], reference: Mapping[str, Any] | None, output: Path) -> None:
    if reference is not None:
        comparison = compare_with(results, reference)
        atomic_write_json(comparison, output / "comparison.json")
        print(comparison_markdown(comparison))


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        config = config_from_args(args)
        reference_path = Path(args.compare) if args.compare else (COMMITTED_RESULTS if args.quick else None)
        reference = _read_reference(reference_path)
        if args.from_json and not Path(args.from_json).is_file():
            raise ValueError(f"no results.json at {args.from_json}")
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    output = Path(args.output or ("artifacts/quality-quick" if args.quick else "bench/quality"))
    if args.from_json:
        results = json.loads(Path(args.from_json).read_text())
        results["summary"] = summarize(results)
        paths = write_outputs(results, output)
        print(results_markdown(results))
        print("written:", ", ".join(str(p) for p in paths.values()))
        _compare(results, reference, output)
        return 0
    work = Path(args.work or (output / "work" if args.quick else "artifacts/quality"))
    configure_logging("%(asctime)s %(name)s %(message)s")
    for noisy in ("httpx", "datasets", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    results = run_study(config, output, work)
    print(results_markdown(results))
    _compare(results, reference, output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
