"""Held-out language-model quality: exact token-weighted perplexity and next-token accuracy.

Counting rule (the same for every model, so pruned and unpruned numbers are comparable):

* a row of ``input_ids`` comes with an ``attention_mask`` (1 = real token, attended; 0 = padding)
  and a ``stats_mask`` (True = a token of a document; False = the separator written between packed
  documents, and padding) — exactly the masks of :class:`reap_fast.data.CalibrationSet`;
* the prediction made at position ``t`` is scored against the token at ``t + 1``; the pair counts
  when the target ``t + 1`` is a document token (``stats_mask[t + 1]``) *and* the input at ``t``
  is a real token (``attention_mask[t] == 1``). So separators and padding are never targets, the
  first token of a row is never a target (nothing predicts it), and the first token of a document
  that follows a separator is a target (the model saw the previous document and the separator);
* perplexity is ``exp`` of the mean negative log-likelihood over all counted targets of all rows
  (token-weighted, not a mean of per-row perplexities), summed in float64; next-token accuracy is
  the share of counted targets whose arg-max logit is the target (ties go to the lowest id, as
  ``torch.argmax``).

Plain texts are turned into such rows by :func:`pack_texts`: documents in the given order, one
separator (EOS) between documents, cut into consecutive windows of ``seq_len`` tokens with nothing
dropped (a document may continue in the next window; the last window is right-padded). Evaluation
runs under ``torch.no_grad`` in ``eval`` mode and visits the rows in order, so it is deterministic.

The pipeline scores each model in a child process (:mod:`reap_fast.evaluate.heldout`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch

from ..config.evaluate import EvalConfig
from ..errors import ReapFastError

__all__ = ["EvalError", "EvalRows", "combine_results", "evaluate_rows", "pack_texts", "perplexity"]


class EvalError(ReapFastError, ValueError):
    """Held-out data or settings that cannot be evaluated (one-line message)."""


@dataclass
class EvalRows:
    """Rows to score: ids, attention mask (1 = real) and target mask (True = document token)."""

    input_ids: torch.LongTensor  # (N, L)
    attention_mask: torch.LongTensor  # (N, L)
    stats_mask: torch.BoolTensor  # (N, L)

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def batches(self, batch_size: int) -> Iterator["EvalRows"]:
        for begin in range(0, len(self), batch_size):
            end = begin + batch_size
            yield EvalRows(self.input_ids[begin:end], self.attention_mask[begin:end], self.stats_mask[begin:end])


def _special_id(tokenizer: Any, names: Sequence[str], default: int | None = None) -> int | None:
    for name in names:
        value = getattr(tokenizer, name, None)
        if isinstance(value, (list, tuple)):
            value = value[0] if value else None
        if isinstance(value, int):
            return value
    return default


def pack_texts(texts: Sequence[str], tokenizer: Any, seq_len: int) -> EvalRows:
    """Documents -> consecutive windows of ``seq_len`` tokens, EOS between documents, nothing dropped."""
    if seq_len < 2:
        raise EvalError(f"seq_len must be at least 2, got {seq_len}")
    texts = [t for t in texts if t]
    if not texts:
        raise EvalError("no non-empty texts to evaluate")
    sep_id = _special_id(tokenizer, ("eos_token_id", "sep_token_id"))
    if sep_id is None:
        raise EvalError("the tokenizer has no EOS token to separate documents")
    pad_id = _special_id(tokenizer, ("pad_token_id",), sep_id)
    ids: list[int] = []
    counted: list[bool] = []
    for index, encoded in enumerate(tokenizer(list(texts), add_special_tokens=False, verbose=False)["input_ids"]):
        if index:
            ids.append(sep_id)
            counted.append(False)
        ids.extend(int(i) for i in encoded)
        counted.extend([True] * len(encoded))
    rows = -(-len(ids) // seq_len)
    input_ids = torch.full((rows * seq_len,), pad_id, dtype=torch.long)
    attention = torch.zeros(rows * seq_len, dtype=torch.long)
    stats = torch.zeros(rows * seq_len, dtype=torch.bool)
    input_ids[: len(ids)] = torch.tensor(ids, dtype=torch.long)
    attention[: len(ids)] = 1
    stats[: len(ids)] = torch.tensor(counted, dtype=torch.bool)
    return EvalRows(input_ids.view(rows, seq_len), attention.view(rows, seq_len), stats.view(rows, seq_len))


def _as_rows(data: Any, tokenizer: Any, seq_len: int | None) -> EvalRows:
    if isinstance(data, EvalRows):
        return data
    if all(hasattr(data, name) for name in ("input_ids", "attention_mask", "stats_mask")):  # a CalibrationSet
        return EvalRows(data.input_ids, data.attention_mask, data.stats_mask.bool())
    if isinstance(data, str):
        data = [data]
    if tokenizer is None:
        raise EvalError("texts need a tokenizer; pass one or give a CalibrationSet / EvalRows")
    if seq_len is None:
        raise EvalError("texts need seq_len")
    return pack_texts(list(data), tokenizer, seq_len)


def _logits(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    output = model(input_ids=input_ids, attention_mask=attention_mask)
    logits = output.logits if hasattr(output, "logits") else output[0] if isinstance(output, tuple) else output
    return logits


def evaluate_rows(model: Any, rows: EvalRows, batch_size: int = EvalConfig.batch_size) -> dict[str, float | int]:
    """Score ``rows`` with ``model`` (see the module docstring for the counting rule)."""
    if batch_size < 1:
        raise EvalError(f"batch_size must be at least 1, got {batch_size}")
    try:
        device = next(model.parameters()).device
    except (AttributeError, StopIteration):
        device = torch.device("cpu")
    was_training = bool(getattr(model, "training", False))
    if hasattr(model, "eval"):
        model.eval()
    nll_sum = 0.0  # python float = float64
    correct = 0
    count = 0
    try:
        with torch.no_grad():
            for batch in rows.batches(batch_size):
                ids = batch.input_ids.to(device)
                attention = batch.attention_mask.to(device)
                logits = _logits(model, ids, attention)[:, :-1, :].float()
                targets = ids[:, 1:]
                counted = batch.stats_mask[:, 1:].to(device) & (attention[:, :-1] == 1)
                if not bool(counted.any()):
                    continue
                picked = logits[counted]  # (T, V)
                wanted = targets[counted]  # (T,)
                log_probs = torch.log_softmax(picked.double(), dim=-1)
                nll_sum += float(-log_probs.gather(1, wanted[:, None]).sum())
                correct += int((picked.argmax(dim=-1) == wanted).sum())
                count += int(counted.sum())
    finally:
        if was_training and hasattr(model, "train"):
            model.train()
    if count == 0:
        raise EvalError("no target tokens to evaluate (every target is padding or a separator)")
    mean_nll = nll_sum / count
    return {
        "perplexity": math.exp(mean_nll),
        "next_token_accuracy": correct / count,
        "tokens": count,
        "mean_nll": mean_nll,
        "bits_per_token": mean_nll / math.log(2),
    }


def perplexity(
    model: Any,
    tokenizer: Any,
    data: Any,
    seq_len: int | None = None,
    batch_size: int = EvalConfig.batch_size,
) -> dict[str, float | int]:
    """Held-out perplexity and next-token accuracy of ``model``.

    ``data`` is a list of texts (packed with :func:`pack_texts`; needs ``tokenizer`` and
    ``seq_len``), one text, a :class:`reap_fast.data.CalibrationSet` (its masks are used as they
    are; ``tokenizer`` and ``seq_len`` may be None) or :class:`EvalRows`. Returns ``perplexity``,
    ``next_token_accuracy``, ``tokens`` (the number of counted targets), ``mean_nll`` (nats) and
    ``bits_per_token`` (= bits per byte for the byte tokenizer).
    """
    return evaluate_rows(model, _as_rows(data, tokenizer, seq_len), batch_size=batch_size)


def combine_results(parts: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Exact token-weighted combination of evaluations of separately packed sets (NLL and hits are sums)."""
    tokens = sum(int(p["tokens"]) for p in parts.values())
    if tokens == 0:
        raise EvalError("nothing to combine")
    nll = sum(p["mean_nll"] * p["tokens"] for p in parts.values()) / tokens
    accuracy = sum(p["next_token_accuracy"] * p["tokens"] for p in parts.values()) / tokens
    return {
        "perplexity": math.exp(nll),
        "next_token_accuracy": accuracy,
        "tokens": tokens,
        "mean_nll": nll,
        "bits_per_token": nll / math.log(2),
        "by_category": {
            name: {k: p[k] for k in ("perplexity", "next_token_accuracy", "tokens")} for name, p in parts.items()
        },
    }
