"""One expert's forward in the experts module's own operations, shared by the reference engine and the
merging statistics (which run for either engine), so neither engine module imports the other."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, transposed: bool) -> torch.Tensor:
    out = x @ weight if transposed else F.linear(x, weight)
    return out + bias if bias is not None else out


def expert_forward(experts: nn.Module, expert: int, x: torch.Tensor) -> torch.Tensor:
    """Expert ``expert``'s unweighted output y on the rows ``x`` (n, H), in the module's own operations."""
    has_gate = getattr(experts, "has_gate", True)
    transposed = getattr(experts, "is_transposed", False)
    has_bias = getattr(experts, "has_bias", False)
    first_proj = experts.gate_up_proj if has_gate else experts.up_proj
    first_bias = (experts.gate_up_proj_bias if has_gate else experts.up_proj_bias) if has_bias else None
    hidden = _linear(x, first_proj[expert], first_bias[expert] if has_bias else None, transposed)
    hidden = experts._apply_gate(hidden) if has_gate else experts.act_fn(hidden)
    down_bias = experts.down_proj_bias[expert] if has_bias else None
    y = _linear(hidden, experts.down_proj[expert], down_bias, transposed)
    if getattr(experts, "has_post_expert_norm", False):
        y = experts.post_expert_norm(y)
    return y
