"""Observation of MoE blocks whose routing weight scales the expert *input* (Llama-4).

Llama-4's ``Llama4TextMoe`` computes ``out = shared_expert(x) + sum_j E_j(s_j * x)`` over the token's
top-k experts j, with ``s_j = sigmoid(logit_j)`` and ``E_j`` a SiLU-gated expert. Its experts module
has no transformers experts interface (every expert runs on every token, with zero scores for the
experts not chosen), so during observation the block's forward is replaced by :func:`input_scaled_moe_forward`,
which runs only the routed (token, expert) pairs through the engine:

* the layer output: every pair becomes one row ``s_j * x`` of weight 1, summed over the slots, so the
  next layer sees what the stock block computes;
* the statistics: y = ``E_j(x)`` on the *unscaled* input and g = the adapter's gate (softmax over all
  router logits). This is what upstream REAP records for Llama-4 (its hook runs the experts on the
  raw hidden states and takes the softmax of the router logits), so observation files agree with it.

The routed experts therefore run twice per pair (once on ``x`` for the statistics, once on ``s_j * x``
for the output): twice the expert compute of a plain forward, on routed rows only.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.integrations.moe import _default_apply_gate


class TransposedExpertsView:
    """Llama-4's experts tensors described with the flags of transformers' decorated experts modules.

    ``gate_up_proj`` (E, H, 2I) and ``down_proj`` (E, I, H) are applied as ``x @ W`` (transposed), the
    first half of ``gate_up`` is the gate (``act(gate) * up``): the engines' default gated layout.
    """

    has_gate = True
    has_bias = False
    has_post_expert_norm = False
    is_transposed = True
    is_concatenated = True
    _apply_gate = _default_apply_gate

    def __init__(self, experts: nn.Module) -> None:
        self.gate_up_proj = experts.gate_up_proj
        self.down_proj = experts.down_proj
        self.act_fn = experts.act_fn


def input_scaled_moe_forward(block: nn.Module, probe, engine, hidden_states: torch.Tensor):
    """Stand-in for ``Llama4TextMoe.forward`` that observes through ``probe`` with ``engine``.

    Returns ``(output, router_logits)`` as the stock forward does.
    """
    hidden = hidden_states.reshape(-1, hidden_states.shape[-1])
    num_tokens, width = hidden.shape
    scores, logits = block.router(hidden)  # scores: sigmoid at the chosen experts, 0 elsewhere
    top_k_index = torch.topk(logits, block.top_k, dim=1).indices  # the router's own choice (same op)
    top_k_scores = scores.gather(1, top_k_index)
    experts = TransposedExpertsView(block.experts)

    unit = torch.ones_like(top_k_scores)
    probe.observe(engine, experts, hidden, top_k_index, unit)  # statistics of E_j(x); its output is not used

    rows = (hidden.unsqueeze(1) * top_k_scores.unsqueeze(-1)).reshape(-1, width)
    routed, _ = engine(experts, rows, top_k_index.reshape(-1, 1), unit.reshape(-1, 1))
    out = block.shared_expert(hidden)
    out.add_(routed.view(num_tokens, block.top_k, width).sum(dim=1).to(out.dtype))
    return out, logits
