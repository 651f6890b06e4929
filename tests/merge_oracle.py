"""The float64 oracle of upstream's five merging statistics, written from upstream's definitions.

Per forward call it computes upstream's per-batch values (``src/reap/metrics.py``: ``ttm_online``,
``get_routed_characteristic_activation``, ``ca_dist_online``, the router-logit distance, the mean
activation) with plain loops over tokens and expert pairs, and folds them into running means the way
upstream's ``OnlineStatsTracker`` does (mean += (value - mean) * n / (count + n)). It shares no code with
reap-fast: not the sums-then-divide formulation, not the Gram matrices, not the chunking.
"""

from __future__ import annotations

import torch

EPS = 1e-8  # torch.nn.functional.cosine_similarity clamps each norm at this value


def cosine_distance64(a: torch.Tensor, b: torch.Tensor) -> float:
    """1 - cos(a, b), each norm clamped at 1e-8, in float64."""
    a, b = a.detach().double(), b.detach().double()
    norm_a = max(float(torch.sqrt((a * a).sum())), EPS)
    norm_b = max(float(torch.sqrt((b * b).sum())), EPS)
    return 1.0 - float((a * b).sum()) / (norm_a * norm_b)


def batch_values(y_all: torch.Tensor, index: torch.Tensor, logits: torch.Tensor) -> dict[str, tuple]:
    """Upstream's per-batch (value, count) of each statistic for counted tokens only.

    ``y_all`` (E, T, H) every expert's output, ``index`` (T, k) the chosen experts, ``logits`` (T, E).
    """
    num_experts, tokens, hidden = y_all.shape
    frequency = torch.zeros(num_experts, dtype=torch.float64)
    ttm = torch.zeros(num_experts, num_experts, dtype=torch.float64)
    routed = torch.zeros(num_experts, hidden, dtype=torch.float64)
    for t in range(tokens):
        for chosen in index[t].tolist():
            frequency[chosen] += 1
            routed[chosen] += y_all[chosen, t]
            for other in range(num_experts):
                ttm[chosen, other] += cosine_distance64(y_all[chosen, t], y_all[other, t])
    pairwise = frequency[None, :] + frequency[:, None]
    ttm = torch.where(pairwise > 0, (ttm + ttm.T) / pairwise.clamp(min=1), 0.0)
    ttm.fill_diagonal_(0.0)
    routed = torch.where(frequency[:, None] > 0, routed / frequency.clamp(min=1)[:, None], 0.0)
    dist = torch.zeros(num_experts, num_experts, dtype=torch.float64)
    router = torch.zeros(num_experts, num_experts, dtype=torch.float64)
    for i in range(num_experts):
        for j in range(num_experts):
            if tokens:
                dist[i, j] = sum(cosine_distance64(y_all[i, t], y_all[j, t]) for t in range(tokens)) / tokens
            router[i, j] = cosine_distance64(logits[:, i], logits[:, j])
    mean = y_all.double().sum(dim=1) / max(tokens, 1)
    n = torch.tensor(float(tokens))
    return {
        "ttm_similarity_matrix": (ttm, pairwise),
        "routed_characteristic_activation": (routed, frequency[:, None].expand(-1, hidden)),
        "characteristic_activation": (mean, n),
        "online_characteristic_activation_dist": (dist, n),
        "router_logit_similiarity": (router, n),
    }


class RunningMeans:
    """Upstream's OnlineStatsTracker arithmetic (without Kahan's compensation, in float64)."""

    def __init__(self) -> None:
        self.mean: dict[str, torch.Tensor] = {}
        self.count: dict[str, torch.Tensor] = {}

    def update(self, values: dict[str, tuple]) -> None:
        for key, (value, count) in values.items():
            mean = self.mean.get(key, torch.zeros_like(value))
            total = self.count.get(key, torch.zeros_like(count)) + count
            step = torch.where(total > 0, (value - mean) * count / total.clamp(min=1e-300), 0.0)
            self.mean[key], self.count[key] = mean + step, total


def router_logits64(router: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """The router's raw linear logits in float64 (its bias where it has one)."""
    logits = hidden.double() @ router.weight.detach().double().T
    bias = getattr(router, "bias", None)
    return logits + bias.detach().double() if isinstance(bias, torch.Tensor) else logits
