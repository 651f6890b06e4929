"""Upstream's merging statistics of one forward call, added into a layer's :class:`~reap_fast.merge_metrics.MergeSums`.

Three of the five statistics need every expert's output on every counted token. They are computed on
the layer's device, engine-independent, in token chunks:

* the counted tokens (the statistics mask; the others are never computed) are cut into chunks of
  ``dense`` tokens; every expert runs on a chunk with the module's own operations
  (:func:`~reap_fast.observe.experts.expert_forward`), its outputs kept in the model's dtype (the values
  upstream casts to fp32, so nothing is lost);
* each chunk is then read in slices of ``exact`` tokens converted to fp32: per token, the Gram matrix
  of the raw outputs (``torch.bmm``, an (E, H) x (H, E) product per token) gives the norms (its
  diagonal) and every cosine at once (no pairwise broadcast); its rows at the token's top-k experts are
  the ttm distances. Sums are float64.

Peak memory beyond the model, per MoE layer call (E experts, H hidden, I intermediate size, k top-k,
b bytes per element of the model dtype)::

    dense * E * H * b                       expert outputs of one chunk
  + exact * E * (H + E) * 4                 fp32 outputs and per-token Gram matrices of one slice
  + exact * k * (H + E) * 8                 routed rows and ttm rows (float64)
  + dense * (3 * I + H) * b                 one expert's intermediate activations (CPU)
  + dense * E * (3 * I + H) * b             every expert's intermediates at once (GPU: batched products)

with ``dense = max(1, DENSE_BYTES // (E * H * b))`` and ``exact = max(1, EXACT_BYTES // (4 * E * (H + E)))``;
never an (E, T, H) buffer for the whole batch. At Qwen3-30B-A3B's shape in bf16 (E = 128, H = 2048,
I = 768, k = 8): dense = 512, exact = 120, about 256 + 128 + 16 + 4 MiB on the CPU, + 0.6 GiB on a GPU.

Routed-only sums (``routed_characteristic_activation``) come from the same outputs at the routed pairs,
the router-logit distance from the router's logits (the router's own linear op, fp32 where the family's
router runs in fp32) of the call's counted tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import EngineUnavailableError
from ..merge_metrics import MergeSums
from .experts import expert_forward

DENSE_BYTES = 256 * 2**20  # expert outputs of one chunk, in the model's dtype
EXACT_BYTES = 128 * 2**20  # fp32 outputs and per-token Gram matrices of one slice
COSINE_EPS = 1e-8  # PyTorch's cosine_similarity clamps each norm at this value


def chunk_sizes(num_experts: int, hidden_size: int, element_size: int) -> tuple[int, int]:
    """(dense, exact): tokens per expert-output chunk and per fp32 slice (see the module docstring)."""
    dense = max(1, DENSE_BYTES // (num_experts * hidden_size * element_size))
    exact = max(1, EXACT_BYTES // (4 * num_experts * (hidden_size + num_experts)))
    return dense, min(exact, dense)


def router_logits(router: nn.Module, hidden_states: torch.Tensor, fp32: bool) -> torch.Tensor:
    """The router's logits (T, E): its own linear op on ``hidden_states`` (fp32 casts when ``fp32``)."""
    weight = getattr(router, "weight", None)
    if not isinstance(weight, torch.Tensor):
        raise EngineUnavailableError(f"{type(router).__name__}: merging statistics need the router's weight")
    bias = getattr(router, "bias", None)
    bias = bias if isinstance(bias, torch.Tensor) else None
    if fp32:
        hidden_states, weight = hidden_states.float(), weight.float()
        bias = None if bias is None else bias.float()
    return F.linear(hidden_states, weight, bias)


def _cosine_gram(columns: torch.Tensor) -> torch.Tensor:
    """cos(columns[i], columns[j]) for the rows of a (E, n) float64 matrix, symmetric."""
    norms = torch.linalg.vector_norm(columns, dim=-1, keepdim=True).clamp_min(COSINE_EPS)
    unit = columns / norms
    gram = unit @ unit.T
    return (gram + gram.T) / 2


def add_router_distance(sums: MergeSums, logits: torch.Tensor) -> None:
    """Add N_b * d(L[:, i], L[:, j]) for one call's counted logits ``logits`` (N_b, E)."""
    count = logits.shape[0]
    if count == 0:
        return
    sums.router_distance += count * (1.0 - _cosine_gram(logits.T.to(torch.float64)))


def add_output_slice(sums: MergeSums, outputs: torch.Tensor, selected: torch.Tensor) -> None:
    """Add one slice of tokens: ``outputs`` (n, E, H) every expert's y, ``selected`` (n, k) their top-k.

    Per token the fp32 Gram matrix of the raw outputs gives the norms (its diagonal) and every cosine.
    """
    count, num_experts, hidden = outputs.shape
    top_k = selected.shape[1]
    y = outputs.float()
    picked = selected.unsqueeze(-1)
    ids = selected.reshape(-1)
    routed = y.gather(1, picked.expand(count, top_k, hidden)).reshape(-1, hidden)
    sums.routed.index_add_(0, ids, routed.to(torch.float64))
    gram = torch.bmm(y, y.transpose(1, 2))  # (n, E, E)
    norms = gram.diagonal(dim1=1, dim2=2).sqrt().clamp_min(COSINE_EPS)
    cosine = gram.div_(norms.unsqueeze(2)).div_(norms.unsqueeze(1))
    total = cosine.sum(dim=0, dtype=torch.float64)
    sums.activation_distance += count - (total + total.T) / 2
    rows = cosine.gather(1, picked.expand(count, top_k, num_experts)).reshape(-1, num_experts)
    sums.ttm.index_add_(0, ids, 1.0 - rows.to(torch.float64))


def all_expert_outputs(experts: nn.Module, x: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Every expert's unweighted output on the rows ``x`` (n, H): (n, E, H) in ``x``'s dtype.

    On a GPU all experts run at once as batched matrix products (:func:`batched_expert_outputs`); on the
    CPU one expert at a time (oneDNN's bf16 products are faster per expert there).
    """
    if x.device.type == "cuda":
        return batched_expert_outputs(experts, x)
    out = x.new_empty(x.shape[0], num_experts, x.shape[1])
    for expert in range(num_experts):
        out[:, expert] = expert_forward(experts, expert, x)
    return out


def batched_expert_outputs(experts: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """:func:`~reap_fast.observe.experts.expert_forward` for every expert at once: (n, E, H), a view.

    Holds (E, n, 2I) and (E, n, H) intermediates in ``x``'s dtype (one launch per projection).
    """
    has_gate = getattr(experts, "has_gate", True)
    transposed = getattr(experts, "is_transposed", False)
    has_bias = getattr(experts, "has_bias", False)
    first = experts.gate_up_proj if has_gate else experts.up_proj
    rows = x.unsqueeze(0).expand(first.shape[0], -1, -1)
    hidden = torch.bmm(rows, first if transposed else first.transpose(1, 2))
    if has_bias:
        hidden = hidden + (experts.gate_up_proj_bias if has_gate else experts.up_proj_bias).unsqueeze(1)
    hidden = experts._apply_gate(hidden) if has_gate else experts.act_fn(hidden)
    y = torch.bmm(hidden, experts.down_proj if transposed else experts.down_proj.transpose(1, 2))
    if has_bias:
        y = y + experts.down_proj_bias.unsqueeze(1)
    if getattr(experts, "has_post_expert_norm", False):
        y = experts.post_expert_norm(y)
    return y.transpose(0, 1)


@torch.no_grad()
def add_merging_statistics(
    sums: MergeSums,
    experts: nn.Module,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    token_mask: torch.Tensor | None,
    logits: torch.Tensor,
) -> None:
    """Add one forward call's merging sums: (T, H) inputs, (T, k) choices, (T,) mask or None, (T, E) logits."""
    if token_mask is not None:
        keep = token_mask.reshape(-1).to(hidden_states.device, torch.bool)
        hidden_states, top_k_index, logits = hidden_states[keep], top_k_index[keep], logits[keep]
    add_router_distance(sums, logits)
    num_experts = logits.shape[1]
    dense, exact = chunk_sizes(num_experts, hidden_states.shape[1], hidden_states.element_size())
    selected = top_k_index.long()
    for start in range(0, hidden_states.shape[0], dense):
        outputs = all_expert_outputs(experts, hidden_states[start : start + dense], num_experts)
        sums.characteristic += outputs.sum(dim=0, dtype=torch.float32).to(torch.float64)
        chosen = selected[start : start + dense]
        for first in range(0, outputs.shape[0], exact):
            add_output_slice(sums, outputs[first : first + exact], chosen[first : first + exact])
