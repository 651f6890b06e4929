"""Quality study: does REAP keep the right experts? Held-out perplexity after pruning, by method.

``python -m reap_fast.study --output bench/quality [--seeds 3] [--steps 1000]``

1. The stdlib corpus (docstrings = ``docs``, sources = ``code``) is split *by document* into train
   (80%), calibration (10%) and eval (10%) parts, per category, with a fixed split seed.
2. The study MoE (Qwen3-MoE, 4 layers x 16 experts, top-2, byte tokenizer) is trained on the train part
   with :func:`reap_fast.train.train_tiny_moe` (``--train-seeds`` models, seeds 0, 1, ...), or reused
   from the work folder when a checkpoint with the same settings is there.
3. For every *calibration seed* (``--seeds``: 0, 1, ...) REAP statistics are observed with the
   reference engine on ``--calib-samples`` packed sequences per category drawn from the calibration
   part (the seed picks and orders the documents), and experts are pruned at every compression ratio
   by every method; the same seed is the seed of the ``random`` method's draw.
4. Every pruned model and the unpruned one are scored on the eval part with
   :func:`reap_fast.evaluate.perplexity` (all eval documents, packed without dropping anything).
5. Optionally, one W4A16 setting: REAP at 50% (first seeds) quantized with auto-round in a child
   process, scored in another child process (loading an auto-round checkpoint patches transformers).

Outputs in ``--output``: ``results.json`` (every run, summaries, settings, training and routing
report, versions, timings), ``results.md`` (tables) and ``quality.png`` (perplexity and accuracy per
method at each ratio: mean over seeds, bars from the smallest to the largest value).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from .evaluate import EvalRows, combine_results, evaluate_rows, pack_texts
from .train import (
    _use_eager_experts,
    read_train_info,
    split_documents,
    stdlib_corpus,
    train_tiny_moe,
)

logger = logging.getLogger(__name__)

DEFAULT_METHODS = ("reap", "frequency", "ean_sum", "weighted_ean_sum", "max_activations", "random")
DEFAULT_RATIOS = (0.25, 0.5)
RESULTS_FORMAT = 1


# --- helpers -------------------------------------------------------------------------------------------


def _evaluate(model: Any, rows: Mapping[str, EvalRows], batch_size: int) -> dict[str, Any]:
    return combine_results({category: evaluate_rows(model, r, batch_size) for category, r in rows.items()})


def _calibration_chunks(texts: Sequence[str], min_chars: int) -> list[str]:
    """Calibration documents joined into texts of at least ``min_chars`` characters (for auto-round)."""
    chunks, current = [], ""
    for text in texts:
        current = f"{current}\n\n{text}" if current else text
        if len(current.encode("utf-8")) >= min_chars:
            chunks.append(current)
            current = ""
    return chunks


def removed_traffic_share(metrics: Mapping[int, Mapping[str, torch.Tensor]], keep: Mapping[int, torch.Tensor]) -> float:
    """Share of the calibration's routed (token, expert) slots that went to removed experts, mean over layers."""
    shares = []
    for layer, kept in keep.items():
        frequency = metrics[layer]["expert_frequency"].double()
        total = float(frequency.sum())
        if total > 0:
            shares.append(1.0 - float(frequency[torch.as_tensor(kept, dtype=torch.long)].sum()) / total)
    return statistics.fmean(shares) if shares else float("nan")


def _summary(values: Sequence[float]) -> dict[str, float]:
    return {
        "mean": statistics.fmean(values),
        "std": statistics.pstdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


def _jaccard(a: Sequence[int], b: Sequence[int]) -> float:
    sa, sb = set(a), set(b)
    return len(sa & sb) / len(sa | sb) if sa | sb else 1.0


def _environment() -> dict[str, Any]:
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": "cpu",
    }


def _train_settings_match(info: Mapping[str, Any] | None, wanted: Mapping[str, Any]) -> bool:
    return info is not None and all(info.get(key) == value for key, value in wanted.items())


# --- the study -------------------------------------------------------------------------------------------


def run_study(
    output_dir: str | os.PathLike,
    work_dir: str | os.PathLike | None = None,
    *,
    seeds: int = 3,
    train_seeds: int = 1,
    steps: int = 600,
    methods: Sequence[str] = DEFAULT_METHODS,
    ratios: Sequence[float] = DEFAULT_RATIOS,
    seq_len: int = 256,
    batch_size: int = 8,
    calib_samples: int = 16,
    documents: Mapping[str, Sequence[str]] | None = None,
    train_options: Mapping[str, Any] | None = None,
    quantize: bool = True,
    quant_options: Mapping[str, Any] | None = None,
    retrain: bool = False,
    plot: bool = True,
    threads: int | None = None,
) -> dict[str, Any]:
    """Run the study and write ``results.json``, ``results.md`` and ``quality.png`` into ``output_dir``.

    ``documents`` (``{category: [texts]}``) replaces the stdlib corpus (tests use a tiny one);
    ``train_options`` are extra keyword arguments of :func:`train_tiny_moe` (e.g. ``batch_size``,
    ``config_overrides``); ``quant_options`` extra keyword arguments of
    :func:`reap_fast.quantize.run_quantize_subprocess`. Returns the results dictionary.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .data import build_calibration_set
    from .observe import Observer
    from .metrics import save_metrics
    from .prune import prune_model, select_experts

    if threads:
        torch.set_num_threads(threads)
    started = time.perf_counter()
    timings: dict[str, float] = {}
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    work_dir = Path(work_dir) if work_dir is not None else Path("artifacts") / "quality"
    work_dir.mkdir(parents=True, exist_ok=True)
    train_options = dict(train_options or {})

    # 1. data splits, written where the calibration loader can read them
    clock = time.perf_counter()
    corpus = documents if documents is not None else stdlib_corpus()
    splits = split_documents(corpus, seed=0)
    categories = sorted(corpus)
    data_dir = work_dir / "data"
    from .corpus import write_jsonl

    calib_files = {c: write_jsonl(splits["calibration"][c], data_dir / f"calibration_{c}.jsonl") for c in categories}
    eval_files = []
    for c in categories:
        if splits["eval"][c]:
            eval_files.append(data_dir / "eval" / f"{c}.json")
            eval_files[-1].parent.mkdir(parents=True, exist_ok=True)
            eval_files[-1].write_text(json.dumps(splits["eval"][c]))
    timings["data_s"] = time.perf_counter() - clock

    results: dict[str, Any] = {
        "format": RESULTS_FORMAT,
        "settings": {
            "seeds": list(range(seeds)),
            "seed_meaning": "calibration sampling seed (which calibration documents are packed, and in which order) "
            "and the seed of the random method's draw",
            "train_seeds": list(range(train_seeds)),
            "steps": steps,
            "methods": list(methods),
            "compression_ratios": list(ratios),
            "seq_len": seq_len,
            "batch_size": batch_size,
            "calibration_sequences_per_category": calib_samples,
            "engine": "reference",
            "split": "by document, per category, 80/10/10 train/calibration/eval, split seed 0",
            "documents": {s: {c: len(splits[s][c]) for c in categories} for s in splits},
            "perplexity_rule": "exp(token-weighted mean NLL over every eval document token that has a preceding "
            "real token; separators and padding are never targets)",
        },
        "environment": _environment(),
        "training": {},
        "baseline": {},
        "runs": [],
    }

    tokenizer = None
    for train_seed in range(train_seeds):
        # 2. train or reuse
        clock = time.perf_counter()
        model_dir = work_dir / f"model-seed{train_seed}-steps{steps}"
        wanted = {"seed": train_seed, "steps": steps, "seq_len": seq_len,
                  "train_documents": {c: len(splits["train"][c]) for c in categories}}
        wanted.update({k: v for k, v in train_options.items() if k in ("batch_size", "lr", "aux_loss_coef")})
        info = read_train_info(model_dir)
        if retrain or not _train_settings_match(info, wanted):
            logger.info("training the study model (seed %d, %d steps) into %s", train_seed, steps, model_dir)
            train_tiny_moe(model_dir, steps=steps, seed=train_seed, seq_len=seq_len, splits=splits, **train_options)
            info = read_train_info(model_dir)
            reused = False
        else:
            logger.info("reusing the trained model in %s", model_dir)
            reused = True
        timings[f"train_seed{train_seed}_s"] = time.perf_counter() - clock
        results["training"][str(train_seed)] = {
            "reused_checkpoint": reused,
            "checkpoint": str(model_dir),
            **{k: v for k, v in info.items() if k not in ("history",)},
            "history": info.get("history", []),
        }

        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        _use_eager_experts(model)
        top_k = int(model.config.num_experts_per_tok)
        num_experts = int(model.config.num_experts)
        expert_params = sum(p.numel() for n, p in model.named_parameters() if ".mlp.experts." in n)
        total_params = sum(p.numel() for p in model.parameters())
        eval_rows = {c: pack_texts(splits["eval"][c], tokenizer, seq_len) for c in categories if splits["eval"][c]}

        # 3. unpruned baseline
        clock = time.perf_counter()
        base = _evaluate(model, eval_rows, batch_size)
        base.update(parameters=total_params, num_experts=num_experts)
        results["baseline"][str(train_seed)] = base
        timings[f"baseline_eval_seed{train_seed}_s"] = time.perf_counter() - clock
        logger.info("unpruned: perplexity %.4f accuracy %.4f", base["perplexity"], base["next_token_accuracy"])

        for seed in range(seeds):
            clock = time.perf_counter()
            spec = ",".join(f"{calib_files[c]}:{calib_samples}" for c in categories)
            calibration = build_calibration_set(spec, tokenizer, samples_per_category=calib_samples,
                                                model_max_length=seq_len, seed=seed)
            with Observer(model, engine="reference", renormalize=True) as observer:
                metrics = observer.run(calibration.batches(batch_size), total=None, progress=False)
            save_metrics(metrics, work_dir / "observations" / f"train{train_seed}-calib{seed}.pt")
            timings[f"observe_train{train_seed}_calib{seed}_s"] = time.perf_counter() - clock
            clock = time.perf_counter()
            for ratio in ratios:
                for method in methods:
                    keep = select_experts(metrics, method=method, compression_ratio=ratio, seed=seed, top_k=top_k)
                    pruned = prune_model(copy.deepcopy(model), keep)
                    score = _evaluate(pruned, eval_rows, batch_size)
                    kept_params = sum(p.numel() for p in pruned.parameters())
                    run = {
                        "train_seed": train_seed,
                        "seed": seed,
                        "method": method,
                        "compression_ratio": ratio,
                        "experts_kept": int(next(iter(keep.values())).numel()),
                        "parameters": kept_params,
                        **score,
                        "perplexity_ratio": score["perplexity"] / base["perplexity"],
                        "kept": {str(layer): [int(i) for i in idx] for layer, idx in sorted(keep.items())},
                        "calibration_tokens": calibration.num_stat_tokens(),
                        "removed_traffic_share": removed_traffic_share(metrics, keep),
                    }
                    results["runs"].append(run)
                    logger.info("train %d calib %d %-16s %.0f%%: perplexity %.4f accuracy %.4f", train_seed, seed,
                                method, ratio * 100, score["perplexity"], score["next_token_accuracy"])
                    del pruned
            timings[f"prune_eval_train{train_seed}_calib{seed}_s"] = time.perf_counter() - clock

        # 5. W4A16 on the first model only
        if quantize and train_seed == 0 and "quantized" not in results:
            clock = time.perf_counter()
            results["quantized"] = _quantize_setting(
                model, tokenizer, splits, categories, eval_files, work_dir, seq_len, batch_size, results, top_k,
                dict(quant_options or {}), torch.get_num_threads(),
            )
            timings["quantize_s"] = time.perf_counter() - clock
        del model
    if not quantize:
        results["quantized"] = {"status": "skipped", "reason": "quantization disabled (--no-quant)"}

    results["summary"] = summarize(results)
    results["expert_params_fraction"] = expert_params / total_params
    timings["total_s"] = time.perf_counter() - started
    results["timings"] = timings
    write_outputs(results, output_dir, plot=plot)
    return results


def _quantize_setting(model, tokenizer, splits, categories, eval_files, work_dir, seq_len, batch_size, results,
                      top_k, quant_options, threads) -> dict[str, Any]:
    """REAP 50% (first train seed, calibration seed 0), W4A16 with auto-round in a child, scored in a child."""
    from .prune import prune_model, save_pruned, select_experts
    from .metrics import load_metrics

    try:
        from . import quantize as quant
    except ImportError as error:
        return {"status": "skipped", "reason": f"reap_fast.quantize unavailable: {error}"}
    try:
        version = quant.auto_round_version()
    except Exception as error:  # auto-round missing
        return {"status": "skipped", "reason": str(error)}
    ratio = 0.5
    metrics = load_metrics(work_dir / "observations" / "train0-calib0.pt")
    keep = select_experts(metrics, method="reap", compression_ratio=ratio, seed=0, top_k=top_k)
    pruned = prune_model(copy.deepcopy(model), keep)
    pruned_dir = save_pruned(pruned, tokenizer, work_dir / "reap50", keep, {"method": "reap", "compression_ratio": ratio},
                             overwrite=True)
    quant_dir = work_dir / "reap50-w4a16"
    texts = _calibration_chunks([d for c in categories for d in splits["calibration"][c]], 2 * seq_len)
    options = {"iters": 50, "nsamples": min(32, len(texts)), "seqlen": seq_len, "batch_size": 8, "device": "cpu",
               "seed": 0}
    options.update(quant_options)
    options["nsamples"] = min(int(options["nsamples"]), len(texts))
    child_env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    clock = time.perf_counter()
    try:
        quant.run_quantize_subprocess(pruned_dir, quant_dir, texts, overwrite=True, capture_output=True,
                                      env=child_env, **options)
    except Exception as error:
        return {"status": "failed", "stage": "quantize", "reason": str(error)[-2000:], "auto_round": version,
                "settings": options}
    quant_seconds = time.perf_counter() - clock
    scores = {}
    for label, folder, quantized in (("reap50_w4a16", quant_dir, True), ("reap50_fp32", pruned_dir, False)):
        out_json = work_dir / f"eval_{label}.json"
        argv = [sys.executable, "-m", "reap_fast.evaluate", "--model", str(folder), "--seq-len", str(seq_len),
                "--batch-size", str(batch_size), "--threads", str(threads), "--json", str(out_json)]
        for file in eval_files:
            argv += ["--texts-file", str(file)]
        if quantized:
            argv.append("--quantized")
        env = dict(child_env)
        env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parent.parent)] +
                                            [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
        done = subprocess.run(argv, capture_output=True, text=True, env=env, check=False)
        if done.returncode != 0:
            return {"status": "failed", "stage": f"evaluate {label}", "reason": done.stderr[-2000:],
                    "auto_round": version, "settings": options}
        scores[label] = json.loads(out_json.read_text())
    disk = {
        label: sum(f.stat().st_size for f in Path(folder).glob("*.safetensors"))
        for label, folder in (("reap50_fp32", pruned_dir), ("reap50_w4a16", quant_dir))
    }
    fp32, w4 = scores["reap50_fp32"], scores["reap50_w4a16"]
    same_run = [r for r in results["runs"] if r["method"] == "reap" and r["compression_ratio"] == ratio
                and r["seed"] == 0 and r["train_seed"] == 0]
    return {
        "status": "done",
        "auto_round": version,
        "settings": {**options, "bits": 4, "group_size": 128, "sym": True, "scheme": "W4A16"},
        "source": "reap, 50%, first training seed, calibration seed 0",
        "reap50_fp32": {k: fp32[k] for k in ("perplexity", "next_token_accuracy", "tokens")},
        "reap50_w4a16": {k: w4[k] for k in ("perplexity", "next_token_accuracy", "tokens")},
        "reap50_fp32_in_study": same_run[0]["perplexity"] if same_run else None,
        "perplexity_change": w4["perplexity"] / fp32["perplexity"] - 1,
        "accuracy_change": w4["next_token_accuracy"] - fp32["next_token_accuracy"],
        "weights_bytes": disk,
        "quantize_seconds": quant_seconds,
        "note": "both scored with python -m reap_fast.evaluate in child processes on the full eval split; the W4A16 "
        "model runs auto-round's CPU torch backend",
    }


# --- summaries and outputs ----------------------------------------------------------------------------------


def summarize(results: Mapping[str, Any]) -> dict[str, Any]:
    """Per (ratio, method): mean/std/min/max over all (train seed, calibration seed) runs; selection overlaps."""
    runs = results["runs"]
    out: dict[str, Any] = {}
    for ratio in results["settings"]["compression_ratios"]:
        key = f"{ratio:g}"
        out[key] = {}
        for method in results["settings"]["methods"]:
            chosen = [r for r in runs if r["method"] == method and r["compression_ratio"] == ratio]
            if not chosen:
                continue
            out[key][method] = {
                "perplexity": _summary([r["perplexity"] for r in chosen]),
                "next_token_accuracy": _summary([r["next_token_accuracy"] for r in chosen]),
                "perplexity_ratio": _summary([r["perplexity_ratio"] for r in chosen]),
                "removed_traffic_share": _summary([r["removed_traffic_share"] for r in chosen])
                if all("removed_traffic_share" in r for r in chosen) else None,
                "jaccard_with_reap": _summary([
                    statistics.fmean(
                        _jaccard(r["kept"][layer], reap["kept"][layer]) for layer in r["kept"]
                    )
                    for r in chosen
                    for reap in runs
                    if reap["method"] == "reap" and reap["compression_ratio"] == ratio
                    and reap["seed"] == r["seed"] and reap["train_seed"] == r["train_seed"]
                ]) if any(r["method"] == "reap" for r in runs) else None,
            }
    return out


def _fmt(value: float, digits: int = 3) -> str:
    return f"{value:.{digits}f}"


def results_markdown(results: Mapping[str, Any]) -> str:
    """The study's tables in markdown."""
    settings = results["settings"]
    lines = ["# REAP quality study (trained tiny Qwen3-MoE, held-out stdlib text)", ""]
    baselines = results["baseline"]
    base_ppl = statistics.fmean(b["perplexity"] for b in baselines.values())
    base_acc = statistics.fmean(b["next_token_accuracy"] for b in baselines.values())
    tokens = next(iter(baselines.values()))["tokens"]
    n = len(settings["seeds"]) * len(settings["train_seeds"])
    lines += [
        f"Unpruned: perplexity **{_fmt(base_ppl)}**, next-token accuracy **{_fmt(base_acc * 100, 2)}%** "
        f"on {tokens} held-out byte tokens. Each pruned cell: mean over {n} run(s) "
        f"(train seeds {settings['train_seeds']} x calibration seeds {settings['seeds']}; the calibration seed is "
        "also the random method's seed), [min, max] in brackets.",
        "",
        "| method | " + " | ".join(f"ppl @{r:.0%} | acc @{r:.0%} | overlap w/ REAP @{r:.0%} | traffic removed @{r:.0%}"
                                   for r in settings["compression_ratios"]) + " |",
        "|---|" + "---:|---:|---:|---:|" * len(settings["compression_ratios"]),
    ]
    summary = results["summary"]
    lines.append("| unpruned | " + " | ".join(f"{_fmt(base_ppl)} | {_fmt(base_acc * 100, 2)}% | - | -"
                                              for _ in settings["compression_ratios"]) + " |")
    for method in settings["methods"]:
        cells = []
        for ratio in settings["compression_ratios"]:
            entry = summary.get(f"{ratio:g}", {}).get(method)
            if entry is None:
                cells.append("- | - | - | -")
                continue
            ppl, acc, jac = entry["perplexity"], entry["next_token_accuracy"], entry["jaccard_with_reap"]
            spread = f" [{_fmt(ppl['min'])}, {_fmt(ppl['max'])}]" if ppl["n"] > 1 else ""
            overlap = _fmt(jac["mean"], 2) if jac else "-"
            traffic = entry.get("removed_traffic_share")
            traffic_text = f"{traffic['mean'] * 100:.1f}%" if traffic else "-"
            cells.append(f"{_fmt(ppl['mean'])}{spread} | {_fmt(acc['mean'] * 100, 2)}% | {overlap} | {traffic_text}")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Overlap w/ REAP: mean Jaccard index between the method's kept experts and REAP's, per layer, same seeds. "
        "Traffic removed: share of the calibration tokens' routed (token, expert) slots that went to the removed "
        "experts, mean over layers.",
        "",
    ]

    quant = results.get("quantized") or {}
    if quant.get("status") == "done":
        lines += [
            "## W4A16 (auto-round) after REAP 50%",
            "",
            "| model | perplexity | accuracy | weights on disk |",
            "|---|---:|---:|---:|",
            f"| REAP 50%, fp32 | {_fmt(quant['reap50_fp32']['perplexity'])} | "
            f"{_fmt(quant['reap50_fp32']['next_token_accuracy'] * 100, 2)}% | "
            f"{quant['weights_bytes']['reap50_fp32'] / 1e6:.2f} MB |",
            f"| REAP 50%, W4A16 | {_fmt(quant['reap50_w4a16']['perplexity'])} | "
            f"{_fmt(quant['reap50_w4a16']['next_token_accuracy'] * 100, 2)}% | "
            f"{quant['weights_bytes']['reap50_w4a16'] / 1e6:.2f} MB |",
            "",
            f"Perplexity change from quantization: {quant['perplexity_change'] * 100:+.2f}% "
            f"(auto-round {quant['auto_round']}, iters={quant['settings'].get('iters')}, "
            f"nsamples={quant['settings'].get('nsamples')}, seqlen={quant['settings'].get('seqlen')}, group size 128, "
            "symmetric; routers kept 16-bit).",
            "",
        ]
    elif quant:
        lines += [f"W4A16 setting: {quant.get('status')} ({quant.get('reason', '')[:300]})", ""]

    lines += ["## Routing of the trained model (held-out text, mean over layers)", ""]
    lines += ["| train seed | | usage CV | max/min share | usage entropy / log E | token entropy / log E | docs-vs-code JS (bits) |",
              "|---|---|---:|---:|---:|---:|---:|"]
    for seed, info in results["training"].items():
        for when in ("before", "after"):
            mean = info[when]["routing"]["mean"]
            lines.append(
                f"| {seed} | {when} training | {_fmt(mean['usage_cv'])} | {_fmt(mean['max_min_ratio'], 2)} | "
                f"{_fmt(mean['usage_entropy'])} | {_fmt(mean['token_entropy'])} | {_fmt(mean.get('category_js_bits', float('nan')))} |"
            )
    lines.append("")
    timings = results.get("timings", {})
    env = results["environment"]
    training = results["training"].values()
    reused = [t for t in training if t.get("reused_checkpoint")]
    train_minutes = sum(t.get("total_seconds", 0.0) for t in training) / 60
    run_minutes = timings.get("total_s", float("nan")) / 60
    if reused:
        timing_text = (f"this run {run_minutes:.1f} min reusing the trained checkpoint, whose training took "
                       f"{train_minutes:.1f} min: {run_minutes + train_minutes:.1f} min in all")
    else:
        timing_text = f"whole study {run_minutes:.1f} min, training ({train_minutes:.1f} min) included"
    first = next(iter(training), {})
    lines.append(
        f"Model: {first.get('parameters', '?')} parameters, trained {first.get('steps', '?')} steps of "
        f"{first.get('batch_size', '?')} x {first.get('seq_len', '?')} tokens ({first.get('epochs', float('nan')):.2f} "
        f"epochs), router aux-loss coefficient {first.get('aux_loss_coef', '?')}."
    )
    lines.append("")
    lines.append(
        f"Run on {env['processor']} ({env['torch_threads']} torch threads, {env.get('cpu_count')} cores shared with "
        f"other work), torch {env['torch']}, transformers {env['transformers']}, Python {env['python']}; {timing_text}."
    )
    return "\n".join(lines) + "\n"


def plot_results(results: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Perplexity (log scale) and accuracy per method at each ratio, mean with min..max bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = results["settings"]
    methods, ratios = settings["methods"], settings["compression_ratios"]
    summary = results["summary"]
    base = results["baseline"]
    base_ppl = statistics.fmean(b["perplexity"] for b in base.values())
    base_acc = statistics.fmean(b["next_token_accuracy"] for b in base.values())
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    width = 0.8 / len(ratios)
    colors = plt.cm.viridis([0.25 + 0.5 * i / max(1, len(ratios) - 1) for i in range(len(ratios))])
    for axis, key, baseline, label in (
        (axes[0], "perplexity", base_ppl, "held-out perplexity (log scale, lower is better)"),
        (axes[1], "next_token_accuracy", base_acc, "held-out next-token accuracy (higher is better)"),
    ):
        for i, ratio in enumerate(ratios):
            xs, means, low, high = [], [], [], []
            for j, method in enumerate(methods):
                entry = summary.get(f"{ratio:g}", {}).get(method)
                if entry is None:
                    continue
                stats = entry[key]
                xs.append(j + (i - (len(ratios) - 1) / 2) * width)
                means.append(stats["mean"])
                low.append(stats["mean"] - stats["min"])
                high.append(stats["max"] - stats["mean"])
            axis.bar(xs, means, width=width * 0.95, color=colors[i], label=f"{ratio:.0%} experts pruned",
                     yerr=[low, high], capsize=3, error_kw={"elinewidth": 1})
        axis.axhline(baseline, color="crimson", linestyle="--", linewidth=1.2, label=f"unpruned ({baseline:.3g})")
        axis.set_xticks(range(len(methods)))
        axis.set_xticklabels(methods, rotation=20)
        axis.set_ylabel(label)
        if key == "perplexity":
            axis.set_yscale("log")
        axis.legend(fontsize=8)
        axis.grid(axis="y", alpha=0.3)
    n = len(settings["seeds"]) * len(settings["train_seeds"])
    env = results["environment"]
    fig.suptitle(
        f"Expert pruning of a trained 4x16-expert top-2 Qwen3-MoE (byte LM, stdlib text) - mean of {n} seed(s), "
        f"bars = min..max\n torch {env['torch']}, transformers {env['transformers']}, CPU",
        fontsize=10,
    )
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_outputs(results: Mapping[str, Any], output_dir: str | os.PathLike, plot: bool = True) -> dict[str, Path]:
    """``results.json``, ``results.md`` and (with ``plot``) ``quality.png`` in ``output_dir``."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": output_dir / "results.json", "markdown": output_dir / "results.md"}
    paths["json"].write_text(json.dumps(results, indent=1, default=_json_default) + "\n")
    paths["markdown"].write_text(results_markdown(results))
    if plot:
        paths["plot"] = plot_results(results, output_dir / "quality.png")
    return paths


def _json_default(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reap_fast.study", description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default="bench/quality", help="where results.json/.md and quality.png go")
    parser.add_argument("--work", default="artifacts/quality", help="checkpoints, data splits, observations")
    parser.add_argument("--seeds", type=int, default=3, help="calibration-sampling (and random-method) seeds")
    parser.add_argument("--train-seeds", type=int, default=1, help="independently trained models")
    parser.add_argument("--steps", type=int, default=600, help="training steps (batch 8 x 256 tokens)")
    parser.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS))
    parser.add_argument("--ratios", nargs="+", type=float, default=list(DEFAULT_RATIOS))
    parser.add_argument("--calib-samples", type=int, default=16, help="packed calibration sequences per category")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--no-quant", action="store_true", help="skip the W4A16 setting")
    parser.add_argument("--quant-iters", type=int, default=50)
    parser.add_argument("--retrain", action="store_true", help="train even when a matching checkpoint exists")
    parser.add_argument("--from-json", default=None, help="only rewrite results.md and quality.png from this results.json")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1 is fastest when other work shares the CPU; 0 = torch's default)")
    args = parser.parse_args(argv)
    if args.from_json:
        results = json.loads(Path(args.from_json).read_text())
        paths = write_outputs(results, args.output)
        print(results_markdown(results))
        print("written:", ", ".join(str(p) for p in paths.values()))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for noisy in ("httpx", "datasets", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    results = run_study(
        args.output,
        args.work,
        seeds=args.seeds,
        train_seeds=args.train_seeds,
        steps=args.steps,
        methods=args.methods,
        ratios=args.ratios,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        calib_samples=args.calib_samples,
        quantize=not args.no_quant,
        quant_options={"iters": args.quant_iters},
        retrain=args.retrain,
        threads=args.threads or None,
    )
    print(results_markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
