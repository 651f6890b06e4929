"""The float64 oracle: REAP statistics computed the slow, obvious way, independent of every engine.

Every expert runs on every token in float64 (as upstream REAP's hooks do), then plain Python loops
over experts pick the routed, non-padding tokens. Used by the reference-path, kernel and CLI tests.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


def _activation64(experts: nn.Module, gate_up: torch.Tensor) -> torch.Tensor:
    """The experts module's own gating, applied in float64."""
    if getattr(experts, "has_gate", True):
        return experts._apply_gate(gate_up)
    return experts.act_fn(gate_up)


def all_expert_outputs64(experts: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """y for every expert on every token: (E, T, H) float64."""
    x = hidden.double()
    num_experts = experts.down_proj.shape[0]
    if not hasattr(experts, "_apply_gate"):
        # Llama-4's experts (no experts interface): the stock module in float64 on the unscaled input
        # repeated for every expert, exactly as upstream REAP's Llama-4 hook runs it
        return copy.deepcopy(experts).double()(x.repeat(num_experts, 1)).view(num_experts, *x.shape)
    transposed = getattr(experts, "is_transposed", False)
    has_bias = getattr(experts, "has_bias", False)
    first = experts.gate_up_proj if getattr(experts, "has_gate", True) else experts.up_proj
    first_bias = getattr(experts, "gate_up_proj_bias", None) if has_bias else None
    outputs = []
    for e in range(num_experts):
        w1, w2 = first[e].double(), experts.down_proj[e].double()
        h = x @ w1 if transposed else x @ w1.T
        if first_bias is not None:
            h = h + first_bias[e].double()
        h = _activation64(experts, h)
        y = h @ w2 if transposed else h @ w2.T
        if has_bias:
            y = y + experts.down_proj_bias[e].double()
        outputs.append(y)
    return torch.stack(outputs)


def oracle_layer_stats(
    experts: nn.Module,
    hidden: torch.Tensor,
    top_k_index: torch.Tensor,
    gates: torch.Tensor,
    token_mask: torch.Tensor | None,
) -> dict[str, torch.Tensor]:
    """Upstream-format statistics of one call, in float64, from dense all-expert outputs."""
    num_experts = experts.down_proj.shape[0]
    y_all = all_expert_outputs64(experts, hidden)
    if token_mask is None:
        token_mask = torch.ones(hidden.shape[0], dtype=torch.bool)
    keep = token_mask.bool().cpu()
    index, gates64, y_all = top_k_index[keep].cpu(), gates[keep].double().cpu(), y_all[:, keep.to(y_all.device)].cpu()
    freq = torch.zeros(num_experts, dtype=torch.int64)
    ean_sum = torch.zeros(num_experts, dtype=torch.float64)
    weighted = torch.zeros(num_experts, dtype=torch.float64)
    gate_sum = torch.zeros(num_experts, dtype=torch.float64)
    max_act = torch.zeros(num_experts, dtype=torch.float64)  # upstream starts the maximum at 0
    for e in range(num_experts):
        for t in range(index.shape[0]):
            for slot in range(index.shape[1]):
                if int(index[t, slot]) != e:
                    continue
                y = y_all[e, t]
                norm = torch.sqrt((y * y).sum())
                freq[e] += 1
                ean_sum[e] += norm
                weighted[e] += gates64[t, slot] * norm
                gate_sum[e] += gates64[t, slot]
                max_act[e] = max(max_act[e], y.max())
    safe = freq.clamp(min=1).double()
    return {
        "total_tokens": torch.tensor(int(keep.sum()), dtype=torch.int64),
        "expert_frequency": freq,
        "pairwise_expert_frequency": freq[None, :] + freq[:, None],
        "ean_sum": ean_sum,
        "weighted_ean_sum": weighted,
        "weighted_expert_frequency_sum": gate_sum,
        "ean_mean": torch.where(freq > 0, ean_sum / safe, 0.0),
        "reap": torch.where(freq > 0, weighted / safe, 0.0),
        "max_activations": max_act,
    }


def merge_oracle(a: dict[str, torch.Tensor] | None, b: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Combine two oracle results of the same layer (sums add, maxima take the max, means recomputed)."""
    if a is None:
        return b
    out = {key: a[key] + b[key] for key in ("total_tokens", "expert_frequency", "pairwise_expert_frequency",
                                            "ean_sum", "weighted_ean_sum", "weighted_expert_frequency_sum")}
    out["max_activations"] = torch.maximum(a["max_activations"], b["max_activations"])
    safe = out["expert_frequency"].clamp(min=1).double()
    used = out["expert_frequency"] > 0
    out["ean_mean"] = torch.where(used, out["ean_sum"] / safe, 0.0)
    out["reap"] = torch.where(used, out["weighted_ean_sum"] / safe, 0.0)
    return out


def assert_metrics_close(ours: dict[str, torch.Tensor], oracle: dict[str, torch.Tensor], rtol: float = 1e-5,
                         atol: float = 1e-6, context: str = "") -> None:
    """Counts equal exactly; float statistics within rtol/atol of the float64 oracle."""
    for key, expected in oracle.items():
        got = ours[key]
        if expected.dtype == torch.int64:
            assert torch.equal(got.cpu(), expected), f"{context} {key}: {got.tolist()} != {expected.tolist()}"
        else:
            torch.testing.assert_close(got.double().cpu(), expected, rtol=rtol, atol=atol, msg=f"{context} {key}")
