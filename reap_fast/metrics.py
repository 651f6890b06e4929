"""REAP statistics: the per-layer accumulator and the observation file format of Cerebras REAP.

Engines (reference PyTorch or Triton) hand one :class:`BatchStats` per MoE forward call to a
:class:`LayerAccumulator`, which folds it into int64 counts and float64 sums on the device. Nothing is
read back to the host until :meth:`LayerAccumulator.to_upstream` builds the saved dictionary.

Saved format (``torch.save``), exactly as upstream's ``MoETransformerObserver.report_state``::

    {layer_index: {
        "total_tokens": int64 scalar,                  # non-padding tokens seen by the layer
        "expert_frequency": int64[E],                  # routed (token, expert) pairs per expert
        "pairwise_expert_frequency": int64[E, E],      # f_i + f_j, summed per batch as upstream does
        "ean_sum": float64[E],                         # sum ||y||
        "weighted_ean_sum": float64[E],                # sum g * ||y||
        "weighted_expert_frequency_sum": float64[E],   # sum g
        "ean_mean": float32[E],                        # ean_sum / frequency (0 where unused)
        "reap": float32[E],                            # weighted_ean_sum / frequency (0 where unused)
        "max_activations": float32[E],                 # max(0, largest element of any y) (upstream starts at 0)
    }}

With merging statistics on (upstream's default ``--record_pruning_metrics_only false``) each layer also holds
upstream's five merging keys, float32 (:mod:`reap_fast.merge_metrics`).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import ReapFastError, one_line
from .fileio import atomic_write
from .merge_metrics import MergeSums, merge_problem
from .outputs import read_head

METRIC_DTYPES: dict[str, torch.dtype] = {
    "total_tokens": torch.int64,
    "expert_frequency": torch.int64,
    "pairwise_expert_frequency": torch.int64,
    "ean_sum": torch.float64,
    "weighted_ean_sum": torch.float64,
    "weighted_expert_frequency_sum": torch.float64,
    "ean_mean": torch.float32,
    "reap": torch.float32,
    "max_activations": torch.float32,
}

LayerMetrics = dict[str, torch.Tensor]

# Per-layer key of the model identity record in files reap-fast writes (see reap_fast.identity).
IDENTITY_KEY = "reap_fast_model"
# Keys that hold counts or sums of norms, gates or maxima floored at zero: never negative.
NON_NEGATIVE_KEYS = tuple(METRIC_DTYPES)
# Raw accumulator keys combined by maximum (across batches, processes, merges); every other key is summed.
MAX_COMBINED_KEYS = ("max_activations",)
# Per-token means and the sums they derive from: mean == sum / frequency where frequency > 0.
MEAN_OF_SUM = {"ean_mean": "ean_sum", "reap": "weighted_ean_sum"}
# Upstream keeps these means as running fp32 averages, so they agree with sum / frequency only to ~1e-4.
MEAN_RTOL = 1e-2


class Observation(dict):
    """``{layer: metrics}`` with the identity of the model it was observed on (None for upstream's files).

    The identity travels in the file under :data:`IDENTITY_KEY` in every layer; in memory it is this
    attribute, so every layer dictionary holds tensors only.
    """

    identity: dict | None = None


class MetricsFileError(ReapFastError, ValueError):
    """An observation file that is missing, unreadable or not in the REAP format."""


@dataclass
class BatchStats:
    """Statistics of one MoE forward call, as an engine produces them (all on the device), named as the file's keys.

    ``total_tokens`` is the number of non-padding tokens; the per-expert tensors have length E and cover
    only routed, non-padding (token, expert) pairs. ``max_activations`` is -inf for unused experts.
    """

    total_tokens: torch.Tensor  # () int64
    expert_frequency: torch.Tensor  # (E,) int32 or int64
    ean_sum: torch.Tensor  # (E,) float32 or float64
    weighted_ean_sum: torch.Tensor  # (E,) float32 or float64
    weighted_expert_frequency_sum: torch.Tensor  # (E,) float32 or float64
    max_activations: torch.Tensor  # (E,) float32


class LayerAccumulator:
    """Running REAP statistics of one MoE layer: counts in int64, sums in float64, maxima in float32.

    With ``hidden_size`` it also carries the merging statistics' sums (``merging``, None otherwise).
    """

    def __init__(self, num_experts: int, device: torch.device | str = "cpu", hidden_size: int | None = None) -> None:
        self.num_experts = num_experts
        self.merging = None if hidden_size is None else MergeSums(num_experts, hidden_size, device)
        self.total_tokens = torch.zeros((), dtype=torch.int64, device=device)
        self.expert_frequency = torch.zeros(num_experts, dtype=torch.int64, device=device)
        self.pairwise_expert_frequency = torch.zeros(num_experts, num_experts, dtype=torch.int64, device=device)
        self.ean_sum = torch.zeros(num_experts, dtype=torch.float64, device=device)
        self.weighted_ean_sum = torch.zeros(num_experts, dtype=torch.float64, device=device)
        self.weighted_expert_frequency_sum = torch.zeros(num_experts, dtype=torch.float64, device=device)
        # Upstream initialises the running maximum with zeros, so the saved value is max(0, max y).
        self.max_activations = torch.zeros(num_experts, dtype=torch.float32, device=device)

    def add(self, batch: BatchStats) -> None:
        """Fold one forward call's statistics in (no host synchronisation)."""
        if batch.expert_frequency.shape != (self.num_experts,):
            raise ValueError(
                f"batch statistics have {tuple(batch.expert_frequency.shape)} experts, layer has {self.num_experts}"
            )
        count = batch.expert_frequency.to(torch.int64)
        self.total_tokens += batch.total_tokens.to(torch.int64)
        self.expert_frequency += count
        # Upstream adds f_i + f_j of every batch; the sum over batches equals F_i + F_j of the totals.
        self.pairwise_expert_frequency += count.unsqueeze(0) + count.unsqueeze(1)
        self.ean_sum += batch.ean_sum.to(torch.float64)
        self.weighted_ean_sum += batch.weighted_ean_sum.to(torch.float64)
        self.weighted_expert_frequency_sum += batch.weighted_expert_frequency_sum.to(torch.float64)
        torch.maximum(self.max_activations, batch.max_activations.to(torch.float32), out=self.max_activations)

    def reap_tensors(self) -> dict[str, torch.Tensor]:
        """The running REAP totals under the file's keys (what the Triton kernels add into in place)."""
        return {
            "total_tokens": self.total_tokens,
            "expert_frequency": self.expert_frequency,
            "pairwise_expert_frequency": self.pairwise_expert_frequency,
            "ean_sum": self.ean_sum,
            "weighted_ean_sum": self.weighted_ean_sum,
            "weighted_expert_frequency_sum": self.weighted_expert_frequency_sum,
            "max_activations": self.max_activations,
        }

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The raw accumulators, for checkpoints and all-reduce (keys are stable)."""
        return {**self.reap_tensors(), **(self.merging.state_tensors() if self.merging is not None else {})}

    def load_state_tensors(self, state: dict[str, torch.Tensor]) -> None:
        """Restore accumulators saved by :meth:`state_tensors` (used by resume)."""
        for key, value in self.state_tensors().items():
            value.copy_(state[key].to(value.device, value.dtype))

    def merge(self, other: LayerAccumulator) -> None:
        """Add another accumulator of the same layer (e.g. from another process)."""
        for key, value in self.state_tensors().items():
            theirs = other.state_tensors()[key].to(value.device)
            if key in MAX_COMBINED_KEYS:
                torch.maximum(value, theirs, out=value)
            else:
                value += theirs

    def to_upstream(self) -> LayerMetrics:
        """The layer's dictionary in upstream's keys and dtypes, on the CPU."""
        freq = self.expert_frequency.cpu()
        safe = freq.clamp(min=1).to(torch.float64)
        used = freq > 0
        ean_sum = self.ean_sum.cpu()
        weighted = self.weighted_ean_sum.cpu()
        merging = {} if self.merging is None else self.merging.to_upstream(
            freq, self.pairwise_expert_frequency, self.total_tokens
        )
        return {
            "total_tokens": self.total_tokens.cpu().clone(),
            "expert_frequency": freq.clone(),
            "pairwise_expert_frequency": self.pairwise_expert_frequency.cpu().clone(),
            "ean_sum": ean_sum.clone(),
            "weighted_ean_sum": weighted.clone(),
            "weighted_expert_frequency_sum": self.weighted_expert_frequency_sum.cpu().clone(),
            "ean_mean": torch.where(used, ean_sum / safe, 0.0).to(torch.float32),
            "reap": torch.where(used, weighted / safe, 0.0).to(torch.float32),
            "max_activations": self.max_activations.cpu().clone(),
            **merging,
        }


def validate_metrics(metrics: object, source: str = "metrics") -> dict[int, LayerMetrics]:
    """Check that ``metrics`` has the REAP keys, dtypes and consistent expert counts; return it."""
    if not isinstance(metrics, dict) or not metrics:
        raise MetricsFileError(f"{source}: expected a non-empty {{layer: {{key: tensor}}}} dictionary")
    for layer, layer_metrics in metrics.items():
        if not isinstance(layer, int):
            raise MetricsFileError(f"{source}: layer key {layer!r} is not an integer")
        if not isinstance(layer_metrics, dict):
            raise MetricsFileError(f"{source}: layer {layer} is not a dictionary")
        missing = [key for key in METRIC_DTYPES if key not in layer_metrics]
        if missing:
            raise MetricsFileError(f"{source}: layer {layer} lacks the keys {', '.join(missing)}")
        num_experts = layer_metrics["expert_frequency"].shape[0]
        for key, dtype in METRIC_DTYPES.items():
            value = layer_metrics[key]
            if not isinstance(value, torch.Tensor) or value.dtype != dtype:
                got = value.dtype if isinstance(value, torch.Tensor) else type(value).__name__
                raise MetricsFileError(f"{source}: layer {layer} key {key} has {got}, expected {dtype}")
            expected_shape = {"total_tokens": (), "pairwise_expert_frequency": (num_experts, num_experts)}.get(
                key, (num_experts,)
            )
            if tuple(value.shape) != expected_shape:
                raise MetricsFileError(
                    f"{source}: layer {layer} key {key} has shape {tuple(value.shape)}, expected {expected_shape}"
                )
        check_values(layer_metrics, f"{source}: layer {layer}")
        problem = merge_problem(layer_metrics, num_experts)
        if problem is not None:
            raise MetricsFileError(f"{source}: layer {layer} {problem}")
    return metrics


def check_values(layer_metrics: LayerMetrics, where: str) -> None:
    """Finite, non-negative values whose means agree with their sums (one-line MetricsFileError otherwise)."""
    for key in METRIC_DTYPES:
        value = layer_metrics[key]
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            bad = int((~torch.isfinite(value)).sum())
            raise MetricsFileError(f"{where} key {key} holds {bad} non-finite values (NaN or inf)")
        if key in NON_NEGATIVE_KEYS and bool((value < 0).any()):
            raise MetricsFileError(f"{where} key {key} holds negative values (counts and sums cannot be negative)")
    frequency = layer_metrics["expert_frequency"]
    if bool((frequency > layer_metrics["total_tokens"]).any()):
        raise MetricsFileError(
            f"{where}: an expert_frequency exceeds total_tokens (a token is routed to an expert once)"
        )
    used = frequency > 0
    safe = frequency.clamp(min=1).to(torch.float64)
    for mean_key, sum_key in MEAN_OF_SUM.items():
        expected = layer_metrics[sum_key] / safe
        mean = layer_metrics[mean_key].to(torch.float64)
        tolerance = MEAN_RTOL * expected.abs() + 1e-6 * float(expected.abs().max().clamp(min=1e-30))
        wrong = used & ((mean - expected).abs() > tolerance)
        if bool(wrong.any()):
            expert = int(wrong.nonzero()[0, 0])
            raise MetricsFileError(
                f"{where}: {mean_key} of expert {expert} is {float(mean[expert]):.6g} but {sum_key} / expert_frequency "
                f"is {float(expected[expert]):.6g}; the file is inconsistent"
            )
    for key in ("ean_sum", "weighted_ean_sum", "weighted_expert_frequency_sum", "ean_mean", "reap"):
        if bool((layer_metrics[key][~used] != 0).any()):
            raise MetricsFileError(f"{where}: {key} is non-zero for an expert that no token was routed to")


def save_metrics(metrics: dict[int, LayerMetrics], path: str | os.PathLike) -> Path:
    """Validate and write an observation file atomically (temporary file + rename)."""
    validate_metrics(metrics, "metrics to save")
    identity = getattr(metrics, "identity", None)
    if identity:
        metrics = {layer: {**values, IDENTITY_KEY: dict(identity)} for layer, values in metrics.items()}
    return atomic_torch_save(metrics, path)


def atomic_torch_save(obj: object, path: str | os.PathLike) -> Path:
    """``torch.save`` into a temporary file beside ``path``, then rename it into place."""
    return atomic_write(path, lambda handle: torch.save(obj, handle))


def looks_like_observation(path: str | os.PathLike) -> bool:
    """Whether ``path`` holds REAP statistics (``{layer: {"expert_frequency": ...}}``), valid or not."""
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # not a torch file, or one with pickled objects
        return False
    return isinstance(data, dict) and bool(data) and all(
        isinstance(layer, int) and isinstance(values, dict) and "expert_frequency" in values
        for layer, values in data.items()
    )


def describe_load_error(exc: BaseException) -> str:
    """One line for a failed ``torch.load(weights_only=True)``: never the advice to allow arbitrary pickles."""
    text = str(exc)
    if "weights_only" in text or "Unsupported global" in text or "Unpickler" in text:
        found = re.search(r"GLOBAL ([\w.]+)", text) or re.search(r"global: ([\w.]+)", text)
        detail = f" (it references {found.group(1)})" if found else ""
        return f"it holds Python objects other than tensors{detail}, which reap-fast refuses to unpickle"
    return f"{exc.__class__.__name__}: {one_line(exc)}"


def is_torch_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` starts as torch.save's files do: a zip archive, or a pickle (protocol 2 or later)."""
    head = read_head(path, 4)
    return head.startswith(b"PK\x03\x04") or (len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5)


def load_metrics(path: str | os.PathLike) -> Observation:
    """Load and validate an observation file (ours or upstream REAP's)."""
    path = Path(path)
    if not path.is_file():
        raise MetricsFileError(f"observation file not found: {path}")
    if not is_torch_file(path):
        raise MetricsFileError(
            f"cannot read observation file {path}: it is not a file torch.save wrote (neither a zip archive nor a "
            "pickle); give the .pt that `reap-fast observe` or upstream REAP saved"
        )
    try:
        metrics = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a corrupt file; pickle refusals run to many lines
        raise MetricsFileError(f"cannot read observation file {path}: {describe_load_error(exc)}") from None
    observation = Observation(validate_metrics(metrics, str(path)))
    identities = [values.pop(IDENTITY_KEY, None) for values in observation.values()]
    # Every key is kept: the nine pruning keys and the five merging ones (both validated), any other as it is.
    observation.identity = identities[0] if isinstance(identities[0], dict) else None
    return observation


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
