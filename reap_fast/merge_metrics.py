"""Upstream REAP's five merging statistics: their running sums, their saved form and their checks.

Upstream's observer (``src/reap/observer.py``, default ``--record_pruning_metrics_only false``) keeps five
``OnlineStatsTracker`` means per layer. A tracker's saved ``mean`` is the count-weighted mean of the
per-batch values it was given, so each one equals a plain sum divided by a count; here the sums are kept
in float64 (so batches, torchrun ranks and resumed runs add up exactly as counts do) and divided when the
file is written. With y_e(t) expert e's output on token t, c(a, b) PyTorch's cosine similarity (each
norm clamped at 1e-8), d = 1 - c, N the counted tokens, f_e the routed pairs of e, P = f_i + f_j
(``pairwise_expert_frequency``) and L the router logits of one forward call's counted tokens::

    ttm_similarity_matrix[i, j]                  = (S[i, j] + S[j, i]) / P[i, j], 0 where P = 0, 0 on the diagonal,
        S[i, j] = sum over counted tokens t routed to i of d(y_i(t), y_j(t))
    routed_characteristic_activation[e]          = sum over tokens routed to e of y_e(t) / f_e  (0 where f_e = 0)
    characteristic_activation[e]                 = sum over counted tokens of y_e(t) / N
    online_characteristic_activation_dist[i, j]  = sum over counted tokens of d(y_i(t), y_j(t)) / N
    router_logit_similiarity[i, j] (sic)         = sum over forward calls b of N_b * d(L_b[:, i], L_b[:, j]) / N

The last one compares logit *columns* over the tokens of one forward call, so it depends on which
sequences share a call (upstream's ``--batch_size``); the other four are sums over tokens. All five are
saved as float32, upstream's tracker dtype.
"""

from __future__ import annotations

import torch

# Saved keys (upstream's spelling, typo included) and their dtype.
MERGE_KEYS: tuple[str, ...] = (
    "ttm_similarity_matrix",
    "routed_characteristic_activation",
    "characteristic_activation",
    "online_characteristic_activation_dist",
    "router_logit_similiarity",
)
MERGE_DTYPE = torch.float32
# E x E distance keys (symmetric, zero diagonal) and E x H activation keys.
DISTANCE_KEYS = ("ttm_similarity_matrix", "online_characteristic_activation_dist", "router_logit_similiarity")
ACTIVATION_KEYS = ("routed_characteristic_activation", "characteristic_activation")
# Cosine distances lie in [0, 2]. Upstream computes them in fp32 (router logits in the model's dtype), so
# a diagonal d(x, x) is rounding noise rather than 0 there: bf16 logits give up to ~4e-3.
DISTANCE_SLACK = 1e-2
SYMMETRY_TOLERANCE = 1e-4
# Prefix of the raw sums in LayerAccumulator.state_tensors (checkpoints, all-reduce): all combined by sum.
STATE_PREFIX = "merge."


class MergeSums:
    """The raw float64 sums behind the five statistics of one layer (E experts, hidden size H)."""

    def __init__(self, num_experts: int, hidden_size: int, device: torch.device | str = "cpu") -> None:
        square = (num_experts, num_experts)
        wide = (num_experts, hidden_size)
        self.hidden_size = hidden_size
        self.ttm = torch.zeros(square, dtype=torch.float64, device=device)  # S (not symmetrised)
        self.routed = torch.zeros(wide, dtype=torch.float64, device=device)
        self.characteristic = torch.zeros(wide, dtype=torch.float64, device=device)
        self.activation_distance = torch.zeros(square, dtype=torch.float64, device=device)
        self.router_distance = torch.zeros(square, dtype=torch.float64, device=device)  # sum of N_b * d_b

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The sums under stable names (prefixed with :data:`STATE_PREFIX`)."""
        return {
            STATE_PREFIX + "ttm": self.ttm,
            STATE_PREFIX + "routed": self.routed,
            STATE_PREFIX + "characteristic": self.characteristic,
            STATE_PREFIX + "activation_distance": self.activation_distance,
            STATE_PREFIX + "router_distance": self.router_distance,
        }

    def to_upstream(
        self, expert_frequency: torch.Tensor, pairwise_frequency: torch.Tensor, total_tokens: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """The five saved statistics (float32, CPU), from the sums and the layer's counts."""
        frequency = expert_frequency.cpu().to(torch.float64)
        pairwise = pairwise_frequency.cpu().to(torch.float64)
        tokens = float(total_tokens)
        ttm = self.ttm.cpu()
        ttm = torch.where(pairwise > 0, (ttm + ttm.T) / pairwise.clamp(min=1), 0.0)
        ttm.fill_diagonal_(0.0)
        routed = torch.where(frequency.unsqueeze(1) > 0, self.routed.cpu() / frequency.clamp(min=1).unsqueeze(1), 0.0)
        per_token = 1.0 / tokens if tokens > 0 else 0.0
        return {
            "ttm_similarity_matrix": ttm.to(MERGE_DTYPE),
            "routed_characteristic_activation": routed.to(MERGE_DTYPE),
            "characteristic_activation": (self.characteristic.cpu() * per_token).to(MERGE_DTYPE),
            "online_characteristic_activation_dist": (self.activation_distance.cpu() * per_token).to(MERGE_DTYPE),
            "router_logit_similiarity": (self.router_distance.cpu() * per_token).to(MERGE_DTYPE),
        }


def merge_problem(layer_metrics: dict[str, torch.Tensor], num_experts: int) -> str | None:
    """What is wrong with a layer's merging statistics (None: absent, or all five valid).

    Checks: all five or none, float32, shapes (E, E) and (E, H) with one H, finite, distances within
    [0, 2], symmetric, zero diagonal (exactly for ``ttm_similarity_matrix``, within the rounding of
    upstream's fp32 / model-dtype cosine for the two others).
    """
    present = [key for key in MERGE_KEYS if key in layer_metrics]
    if not present:
        return None
    if len(present) != len(MERGE_KEYS):
        missing = [key for key in MERGE_KEYS if key not in layer_metrics]
        return f"has merging statistics without {', '.join(missing)} (a file holds all five or none)"
    hidden = None
    for key in MERGE_KEYS:
        value = layer_metrics[key]
        if not isinstance(value, torch.Tensor) or value.dtype != MERGE_DTYPE:
            got = value.dtype if isinstance(value, torch.Tensor) else type(value).__name__
            return f"key {key} has {got}, expected {MERGE_DTYPE}"
        if key in ACTIVATION_KEYS:
            hidden = value.shape[-1] if hidden is None and value.dim() == 2 else hidden
            expected = (num_experts, hidden)
        else:
            expected = (num_experts, num_experts)
        if tuple(value.shape) != expected:
            return f"key {key} has shape {tuple(value.shape)}, expected {expected}"
        if not bool(torch.isfinite(value).all()):
            return f"key {key} holds {int((~torch.isfinite(value)).sum())} non-finite values (NaN or inf)"
    for key in DISTANCE_KEYS:
        problem = _distance_problem(layer_metrics[key].to(torch.float64), exact_diagonal=key == DISTANCE_KEYS[0])
        if problem is not None:
            return f"key {key} {problem}"
    return None


def _distance_problem(matrix: torch.Tensor, exact_diagonal: bool) -> str | None:
    if bool((matrix < -DISTANCE_SLACK).any()) or bool((matrix > 2 + DISTANCE_SLACK).any()):
        return f"holds values outside [0, 2] (cosine distances): {float(matrix.min()):.4g} .. {float(matrix.max()):.4g}"
    asymmetry = float((matrix - matrix.T).abs().max()) if matrix.numel() else 0.0
    if asymmetry > SYMMETRY_TOLERANCE:
        return f"is not symmetric (largest |D - D^T| is {asymmetry:.3g})"
    diagonal = matrix.diagonal().abs()
    limit = 0.0 if exact_diagonal else DISTANCE_SLACK
    if diagonal.numel() and float(diagonal.max()) > limit:
        return f"has a non-zero diagonal (largest |D[e, e]| is {float(diagonal.max()):.3g})"
    return None
