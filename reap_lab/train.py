"""Train a small Qwen3-MoE on offline text, so that pruning studies have experts that actually specialise.

The seeded random tiny model of :mod:`reap_lab.tiny` routes by chance; pruning it says nothing about
pruning methods. :func:`train_tiny_moe` trains the same architecture (byte tokenizer, 16 experts,
top-2, sizes divisible by 128 so that W4A16 group-128 quantization applies) on the training split of
the Python standard library's docstrings and sources (:mod:`reap_lab.corpus`), with:

* a split *by document* into train / calibration / eval parts (:func:`split_documents`), so that
  held-out perplexity is measured on documents the model never saw and the REAP calibration text is
  disjoint from both;
* AdamW, linear warm-up then cosine decay, gradient clipping, random windows of ``seq_len + 1``
  tokens from the concatenated training documents (EOS between documents);
* the router auxiliary load-balancing loss switched on (``output_router_logits=True``,
  ``router_aux_loss_coef``). The loss is the Switch-Transformer loss computed *per layer* and averaged
  over layers, ``E * sum_i f_i * P_i`` with ``f_i`` the share of top-k slots given to expert ``i`` and
  ``P_i`` its mean router probability (1.0 when perfectly balanced). transformers' built-in version
  pools the counts of all layers before multiplying, which lets one layer's imbalance hide behind
  another's, so the loop computes it itself from the returned router logits;
* everything seeded (initialisation, data order, window sampling), a fixed thread count and torch's
  deterministic algorithms (:func:`reproducible`): the same seed, processor, thread count and library
  versions give bit-identical weights. Another processor (other vector instructions, e.g. AVX2 vs
  AVX-512/AMX) rounds differently, and the differences grow over the steps: it trains another model.

After training it reports, on the held-out split, routing statistics before and after training
(:func:`routing_statistics`): expert-usage balance (coefficient of variation and max/min of the
expert shares, normalised usage entropy), how decisive the router is per token (mean normalised
entropy of the router's softmax) and how differently prose and code are routed (Jensen-Shannon
divergence of the two usage distributions) — evidence that experts specialised without collapsing.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import platform
import random
import time
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F

from reap_fast.config.checks import check_range
from reap_fast.evaluate import EvalRows, pack_texts, perplexity
from reap_fast.fileio import atomic_write_json
from .environment import environment_record
from .tiny import build_model, byte_tokenizer, save_checkpoint, tiny_qwen3_moe_config

logger = logging.getLogger(__name__)

TRAIN_INFO_FILE = "train_info.json"

# The study model: every linear's in-features divisible by 128 (W4A16 with group size 128).
STUDY_MODEL_CONFIG: dict[str, Any] = dict(
    hidden_size=128,
    intermediate_size=256,
    moe_intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    num_experts=16,
    num_experts_per_tok=2,
    norm_topk_prob=True,
)

SPLITS = ("train", "calibration", "eval")
DEFAULT_FRACTIONS = (0.8, 0.1, 0.1)


# --- data --------------------------------------------------------------------------------------------


def split_documents(
    documents: Mapping[str, Sequence[str]],
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    seed: int = 0,
) -> dict[str, dict[str, list[str]]]:
    """Split each category's documents into disjoint ``train`` / ``calibration`` / ``eval`` lists.

    Per category the documents are permuted with ``seed`` and cut by ``fractions`` (at least one
    document goes to each of calibration and eval when there are three or more). Returns
    ``{split: {category: [documents]}}``; every document lands in exactly one split.
    """
    if len(fractions) != 3 or any(f < 0 for f in fractions) or not math.isclose(sum(fractions), 1.0):
        raise ValueError(f"fractions must be three non-negative numbers summing to 1, got {fractions}")
    out: dict[str, dict[str, list[str]]] = {split: {} for split in SPLITS}
    for offset, (category, docs) in enumerate(sorted(documents.items())):
        docs = list(docs)
        order = torch.randperm(len(docs), generator=torch.Generator().manual_seed(seed * 1000 + offset)).tolist()
        n = len(docs)
        n_cal = max(1, round(n * fractions[1])) if n >= 3 else 0
        n_eval = max(1, round(n * fractions[2])) if n >= 3 else 0
        n_train = n - n_cal - n_eval
        chosen = [docs[i] for i in order]
        out["train"][category] = chosen[:n_train]
        out["calibration"][category] = chosen[n_train : n_train + n_cal]
        out["eval"][category] = chosen[n_train + n_cal :]
    return out


def stdlib_corpus() -> dict[str, list[str]]:
    """The offline corpus by category: ``{"docs": docstrings, "code": sources}``."""
    from .corpus import stdlib_code_documents, stdlib_doc_documents

    return {"docs": stdlib_doc_documents(), "code": stdlib_code_documents()}


def token_stream(texts: Sequence[str], tokenizer: Any) -> torch.LongTensor:
    """All texts tokenized and concatenated, EOS after every document."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for encoded in tokenizer(list(texts), add_special_tokens=False, verbose=False)["input_ids"]:
        ids.extend(encoded)
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)


# --- model ---------------------------------------------------------------------------------------------


def study_config(aux_loss_coef: float = 0.01, **overrides: Any):
    """The Qwen3-MoE config of the trained study model (``overrides`` win)."""
    settings = dict(STUDY_MODEL_CONFIG)
    settings.update(output_router_logits=True, router_aux_loss_coef=aux_loss_coef)
    settings.update(overrides)
    return tiny_qwen3_moe_config(**settings)


def use_eager_experts(model: Any) -> None:
    """The per-expert loop is by far the fastest experts implementation for tiny experts on a CPU."""
    if hasattr(model, "set_experts_implementation"):
        try:
            model.set_experts_implementation("eager")
        except Exception:  # an implementation that cannot be switched keeps its default
            logger.debug("could not switch to eager experts", exc_info=True)


def _init_for_training(config: Any, seed: int):
    """``build_model`` weights, with the routers re-drawn at the usual small scale (std = initializer_range).

    ``build_model`` gives routers unit-variance weights so that untrained test models route
    non-trivially; for training that makes routing nearly hard from step 0.
    """
    model = build_model(config, seed=seed)
    generator = torch.Generator().manual_seed(seed + 2)
    std = float(getattr(config, "initializer_range", 0.02))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("mlp.gate.weight") and param.dim() == 2:
                param.copy_(torch.randn(param.shape, generator=generator) * std)
    return model


def switch_aux_loss(router_logits: Sequence[torch.Tensor], top_k: int) -> torch.Tensor:
    """Per-layer Switch load-balancing loss averaged over layers (1.0 = perfectly balanced)."""
    losses = []
    for logits in router_logits:
        probs = torch.softmax(logits.float(), dim=-1)
        num_experts = probs.shape[-1]
        chosen = probs.topk(top_k, dim=-1).indices
        share = torch.zeros(num_experts, dtype=probs.dtype, device=probs.device)
        share.scatter_add_(0, chosen.reshape(-1), torch.ones(chosen.numel(), dtype=probs.dtype, device=probs.device))
        share = share / chosen.numel()
        losses.append(num_experts * torch.sum(share * probs.mean(dim=0)))
    return torch.stack(losses).mean()


# --- routing statistics ------------------------------------------------------------------------------------


def _entropy(p: torch.Tensor) -> torch.Tensor:
    p = p.double()
    return -(p * torch.log(p.clamp_min(1e-300))).sum(dim=-1)


def _js_bits(p: torch.Tensor, q: torch.Tensor) -> float:
    m = (p + q) / 2
    return float((_entropy(m) - (_entropy(p) + _entropy(q)) / 2) / math.log(2))


def routing_statistics(model: Any, rows_by_category: Mapping[str, EvalRows], batch_size: int = 8) -> dict[str, Any]:
    """Top-k routing statistics of every MoE layer on the counted tokens of ``rows_by_category``.

    Per layer: ``usage_share`` (share of top-k slots per expert, all categories), ``usage_cv``
    (population std / mean of the shares; 0 = perfectly balanced), ``max_min_ratio`` (largest over
    smallest share; inf when an expert is never chosen), ``usage_entropy`` (entropy of the shares
    / log E; 1 = balanced), ``token_entropy`` (mean over tokens of the router softmax's entropy / log E;
    lower = more decisive routing), ``category_js_bits`` (Jensen-Shannon divergence, in bits, between
    the usage shares of the first two categories; 0 = routed alike, 1 = disjoint experts). ``mean``
    averages the scalar figures over layers.
    """
    model.eval()
    device = next(model.parameters()).device
    counts: dict[str, list[torch.Tensor]] = {}
    entropy_sum: list[float] = []
    tokens = 0
    with torch.no_grad():
        for category, rows in rows_by_category.items():
            for batch in rows.batches(batch_size):
                out = model(
                    input_ids=batch.input_ids.to(device),
                    attention_mask=batch.attention_mask.to(device),
                    output_router_logits=True,
                    use_cache=False,
                )
                mask = batch.stats_mask.reshape(-1).to(device)
                layers = out.router_logits
                if category not in counts:
                    counts[category] = [torch.zeros(l.shape[-1], dtype=torch.float64) for l in layers]
                if not entropy_sum:
                    entropy_sum = [0.0] * len(layers)
                top_k = int(model.config.num_experts_per_tok)
                for index, logits in enumerate(layers):
                    probs = torch.softmax(logits.float(), dim=-1)[mask]
                    chosen = probs.topk(top_k, dim=-1).indices.reshape(-1).cpu()
                    counts[category][index] += torch.bincount(chosen, minlength=probs.shape[-1]).double()
                    entropy_sum[index] += float(_entropy(probs).sum())
                tokens += int(mask.sum())
    categories = list(counts)
    num_layers = len(entropy_sum)
    per_layer = []
    for index in range(num_layers):
        total = sum(counts[c][index] for c in categories)
        share = total / total.sum()
        num_experts = share.numel()
        log_e = math.log(num_experts)
        smallest = float(share.min())
        layer = {
            "layer": index,
            "usage_share": [round(float(s), 6) for s in share],
            "usage_cv": float(share.std(unbiased=False) / share.mean()),
            "max_min_ratio": float(share.max()) / smallest if smallest > 0 else float("inf"),
            "max_share": float(share.max()),
            "min_share": smallest,
            "usage_entropy": float(_entropy(share)) / log_e,
            "token_entropy": entropy_sum[index] / tokens / log_e,
            "unused_experts": int((total == 0).sum()),
        }
        if len(categories) >= 2:
            a, b = (counts[c][index] / counts[c][index].sum() for c in categories[:2])
            layer["category_js_bits"] = _js_bits(a, b)
        per_layer.append(layer)
    scalar_keys = [k for k in per_layer[0] if k not in ("layer", "usage_share")] if per_layer else []
    mean = {k: sum(layer[k] for layer in per_layer) / num_layers for k in scalar_keys}
    return {"tokens": tokens, "categories": categories, "layers": per_layer, "mean": mean}


# --- training -------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def reproducible(seed: int, threads: int = 1) -> Iterator[None]:
    """Seed torch and ``random``, fix torch's thread count and switch on deterministic algorithms; restore after."""
    if threads < 1:
        raise ValueError(f"threads must be at least 1, got {threads}")
    previous_threads = torch.get_num_threads()
    previous_deterministic = torch.are_deterministic_algorithms_enabled()
    previous_warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(seed)
    random.seed(seed)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous_deterministic, warn_only=previous_warn_only)
        torch.set_num_threads(previous_threads)


def _lr_at(step: int, steps: int, lr: float, warmup: int, final_fraction: float = 0.1) -> float:
    if warmup and step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * (final_fraction + (1 - final_fraction) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


@dataclass(frozen=True)
class TrainConfig:
    """How :func:`train_tiny_moe` trains (validated on creation; the recipe is in the module docstring)."""

    steps: int = 600
    seed: int = 0  # initialisation and window sampling
    batch_size: int = 8
    seq_len: int = 256
    lr: float = 3e-3  # peak learning rate
    weight_decay: float = 0.1  # on weight matrices other than embeddings and norms
    warmup_steps: int | None = None  # None: min(100, steps // 10)
    aux_loss_coef: float = 0.01
    grad_clip: float = 1.0  # largest gradient norm; 0 = no clipping
    split_seed: int = 0  # splits the given documents when no splits are given
    config_overrides: Mapping[str, Any] | None = None  # model settings on top of STUDY_MODEL_CONFIG
    eval_max_rows: int | None = 64  # held-out rows per category in the before/after report (None = all)
    log_every: int = 50
    threads: int = 1  # torch threads while training

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "seq_len", "log_every", "threads", "eval_max_rows"):
            check_range(name, getattr(self, name), 1)
        for name in ("seed", "split_seed", "weight_decay", "warmup_steps", "aux_loss_coef", "grad_clip"):
            check_range(name, getattr(self, name), 0)
        check_range("lr", self.lr, 0, open_low=True)
        object.__setattr__(self, "config_overrides", MappingProxyType(dict(self.config_overrides or {})))

    @property
    def warmup(self) -> int:
        """Warm-up steps of the learning-rate schedule."""
        return self.warmup_steps if self.warmup_steps is not None else min(100, self.steps // 10)


def train_tiny_moe(
    output_dir: str | os.PathLike,
    config: TrainConfig | None = None,
    *,
    documents: Mapping[str, Sequence[str]] | None = None,
    splits: Mapping[str, Mapping[str, Sequence[str]]] | None = None,
) -> Path:
    """Train the study MoE and save it (model, tokenizer, ``train_info.json``) in ``output_dir``.

    ``config`` (default: :class:`TrainConfig`'s defaults) says how.
    Text comes from ``splits`` (``{"train"|"eval": {category: [docs]}}``, e.g. from
    :func:`split_documents`), else from ``documents`` (``{category: [docs]}``, split here with
    ``split_seed``), else from the stdlib corpus. Training runs under :func:`reproducible` with the
    config's seed and threads. Returns the checkpoint folder.
    """
    config = TrainConfig() if config is None else config
    with reproducible(config.seed, config.threads):
        started = time.perf_counter()
        if splits is None:
            splits = split_documents(documents if documents is not None else stdlib_corpus(), seed=config.split_seed)
        train_texts = [doc for category in sorted(splits["train"]) for doc in splits["train"][category]]
        tokenizer = byte_tokenizer()
        stream = token_stream(train_texts, tokenizer)
        if stream.numel() <= config.seq_len + 1:
            raise ValueError(
                f"the training text has {stream.numel()} tokens, fewer than seq_len + 1 = {config.seq_len + 1}"
            )

        model_config = study_config(aux_loss_coef=config.aux_loss_coef, **config.config_overrides)
        model = _init_for_training(model_config, config.seed)
        use_eager_experts(model)

        eval_rows = {
            category: cap_rows(pack_texts(docs, tokenizer, config.seq_len), config.eval_max_rows)
            for category, docs in sorted(splits["eval"].items())
            if docs
        }
        before = _held_out_report(model, eval_rows, config.batch_size)
        history, train_seconds = _train(model, stream, config)
        model.eval()
        after = _held_out_report(model, eval_rows, config.batch_size)

        model.config.output_router_logits = False  # saved for inference; the training setting is in train_info
        folder = save_checkpoint(model, tokenizer, output_dir)
        info = {
            "seed": config.seed,
            "split_seed": config.split_seed,
            "steps": config.steps,
            "batch_size": config.batch_size,
            "seq_len": config.seq_len,
            "lr": config.lr,
            "weight_decay": config.weight_decay,
            "warmup_steps": config.warmup,
            "aux_loss_coef": config.aux_loss_coef,
            "aux_loss": "per-layer Switch loss E*sum(f_i*P_i), averaged over layers",
            "grad_clip": config.grad_clip,
            "config": {k: getattr(model_config, k) for k in STUDY_MODEL_CONFIG} | dict(config.config_overrides),
            "parameters": sum(p.numel() for p in model.parameters()),
            "train_documents": {c: len(d) for c, d in sorted(splits["train"].items())},
            "eval_documents": {c: len(d) for c, d in sorted(splits["eval"].items())},
            "train_tokens": int(stream.numel()),
            "tokens_seen": config.steps * config.batch_size * config.seq_len,
            "epochs": config.steps * config.batch_size * config.seq_len / stream.numel(),
            "history": history,
            "before": before,
            "after": after,
            "train_seconds": train_seconds,
            "total_seconds": time.perf_counter() - started,
            "threads": torch.get_num_threads(),
            "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
            "environment": environment_record(),
            "torch": torch.__version__,
            "transformers": __import__("transformers").__version__,
            "python": platform.python_version(),
        }
        atomic_write_json(info, folder / TRAIN_INFO_FILE)  # its presence marks a finished training
        return folder


def _train(model: Any, stream: torch.Tensor, config: TrainConfig) -> tuple[list[dict[str, float]], float]:
    """The training loop on random windows of ``stream``; returns (loss history, seconds)."""

    def decayed(name: str, param: torch.Tensor) -> bool:
        return param.dim() >= 2 and "embed" not in name and "norm" not in name

    named = list(model.named_parameters())
    optimizer = torch.optim.AdamW(
        [
            {"params": [p for n, p in named if decayed(n, p)], "weight_decay": config.weight_decay},
            {"params": [p for n, p in named if not decayed(n, p)], "weight_decay": 0.0},
        ],
        lr=config.lr,
        betas=(0.9, 0.95),
    )
    sampler = torch.Generator().manual_seed(config.seed + 3)
    top_k = int(model.config.num_experts_per_tok)
    history: list[dict[str, float]] = []
    window = torch.arange(config.seq_len + 1)
    model.train()
    train_started = time.perf_counter()
    running = {"lm": 0.0, "aux": 0.0, "n": 0}
    for step in range(config.steps):
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, config.steps, config.lr, config.warmup)
        starts = torch.randint(0, stream.numel() - config.seq_len - 1, (config.batch_size,), generator=sampler)
        chunk = stream[starts[:, None] + window]
        inputs, targets = chunk[:, :-1], chunk[:, 1:]
        out = model(input_ids=inputs, output_router_logits=True, use_cache=False)
        lm_loss = F.cross_entropy(out.logits.reshape(-1, out.logits.shape[-1]).float(), targets.reshape(-1))
        aux = switch_aux_loss(out.router_logits, top_k)
        loss = lm_loss + config.aux_loss_coef * aux
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        running["lm"] += float(lm_loss.detach())
        running["aux"] += float(aux.detach())
        running["n"] += 1
        if (step + 1) % config.log_every == 0 or step == 0 or step + 1 == config.steps:
            entry = {
                "step": step + 1,
                "lm_loss": running["lm"] / running["n"],
                "aux_loss": running["aux"] / running["n"],
                "lr": optimizer.param_groups[0]["lr"],
                "elapsed_s": time.perf_counter() - train_started,
            }
            history.append(entry)
            logger.info("step %d/%d lm %.4f aux %.4f", entry["step"], config.steps, entry["lm_loss"], entry["aux_loss"])
            running = {"lm": 0.0, "aux": 0.0, "n": 0}
    return history, time.perf_counter() - train_started


def cap_rows(rows: EvalRows, max_rows: int | None) -> EvalRows:
    """The first ``max_rows`` rows (all when None)."""
    if max_rows is None or len(rows) <= max_rows:
        return rows
    return EvalRows(rows.input_ids[:max_rows], rows.attention_mask[:max_rows], rows.stats_mask[:max_rows])


def _held_out_report(model: Any, rows_by_category: Mapping[str, EvalRows], batch_size: int) -> dict[str, Any]:
    """Held-out perplexity per category and routing statistics."""
    quality = {c: perplexity(model, None, rows, batch_size=batch_size) for c, rows in rows_by_category.items()}
    return {"eval": quality, "routing": routing_statistics(model, rows_by_category, batch_size)}


def read_train_info(folder: str | os.PathLike) -> dict[str, Any] | None:
    """The ``train_info.json`` of a trained checkpoint, or None."""
    path = Path(folder) / TRAIN_INFO_FILE
    return json.loads(path.read_text()) if path.is_file() else None
