"""Upstream REAP's own observer (``src/reap/observer.py``) on a transformers-4.55-shaped Qwen3 MoE block.

Upstream's ``MoETransformerObserver`` with ``Qwen3MoEObserverHookConfig`` hooks modules whose class name is
``Qwen3MoeSparseMoeBlock`` and expects transformers 4.55's layout: ``module.experts`` a ``ModuleList`` of
SwiGLU expert MLPs, ``num_experts`` / ``top_k`` attributes, and ``(hidden, router_logits)`` as the block's
output. transformers 5.x fuses the experts into 3D tensors, so this module builds a minimal stand-in with
4.55's shape (our own code, not upstream's) whose weights are *views* of the fused ``Qwen3MoeExperts`` the
other benchmark variants use: every variant computes the same layer.

Upstream's code is never copied into this repository: ``load_observer()`` exports ``src/`` of the bare git
snapshot (``REAP_UPSTREAM_GIT``, default ``/work/.mirror/CerebrasResearch+reap/repo``) into a temporary
folder at run time (``git archive HEAD src | tar -x``) and imports ``reap.observer`` from there. A
third-party module that upstream imports and this environment lacks is stubbed by an empty module in
``sys.modules`` (never by editing upstream's code); ``STUBBED`` lists them (empty in this venv).
"""

from __future__ import annotations

import atexit
import importlib
import os
import shutil
import subprocess
import sys
import tempfile
import types
from functools import lru_cache

import torch
from torch import nn

UPSTREAM_GIT = os.environ.get("REAP_UPSTREAM_GIT", "/work/.mirror/CerebrasResearch+reap/repo")
STUBBED: list[str] = []


def unavailable() -> str | None:
    """Why upstream's observer cannot be loaded here (None: it can)."""
    if not os.path.isdir(UPSTREAM_GIT):
        return f"upstream REAP snapshot not found at {UPSTREAM_GIT} (set REAP_UPSTREAM_GIT to a bare clone)"
    try:
        load_observer()
    except Exception as error:  # export or import failed
        return f"upstream reap.observer does not load: {type(error).__name__}: {str(error)[:150]}"
    return None


@lru_cache(maxsize=None)
def load_observer() -> types.ModuleType:
    """``reap.observer`` imported from a temporary export of the upstream snapshot's ``src/``."""
    folder = tempfile.mkdtemp(prefix="reap-upstream-")
    atexit.register(shutil.rmtree, folder, True)
    archive = subprocess.run(["git", "--git-dir", UPSTREAM_GIT, "archive", "HEAD", "src"], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", folder], input=archive, check=True, capture_output=True)
    source = os.path.join(folder, "src")
    if "reap" in sys.modules and not str(getattr(sys.modules["reap"], "__file__", "")).startswith(folder):
        raise ImportError(f"another module named reap is already imported: {sys.modules['reap']}")
    sys.path.insert(0, source)
    for _ in range(10):
        try:
            return importlib.import_module("reap.observer")
        except ModuleNotFoundError as error:  # a third-party import missing here: stub only that one
            name = error.name or ""
            if not name or name.split(".")[0] == "reap" or name in sys.modules:
                raise
            sys.modules[name] = types.ModuleType(name)
            STUBBED.append(name)
            for loaded in [m for m in sys.modules if m == "reap" or m.startswith("reap.")]:
                del sys.modules[loaded]
    raise ImportError(f"reap.observer still fails after stubbing {STUBBED}")


class Qwen3MoeMLP(nn.Module):
    """One SwiGLU expert as transformers 4.55 stores it (gate, up, down projections)."""

    def __init__(self, gate_proj: torch.Tensor, up_proj: torch.Tensor, down_proj: torch.Tensor, act_fn):
        super().__init__()
        self.gate_proj = nn.Parameter(gate_proj, requires_grad=False)  # (I, H)
        self.up_proj = nn.Parameter(up_proj, requires_grad=False)  # (I, H)
        self.down_proj = nn.Parameter(down_proj, requires_grad=False)  # (H, I)
        self.act_fn = act_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        linear = nn.functional.linear
        return linear(self.act_fn(linear(x, self.gate_proj)) * linear(x, self.up_proj), self.down_proj)


class Qwen3MoeSparseMoeBlock(nn.Module):
    """transformers 4.55's Qwen3 MoE block shape: router ``gate``, ``ModuleList`` of experts, eager loop,
    returns ``(hidden (B, S, H), router_logits (B*S, E))``. Expert weights are views of the fused experts."""

    def __init__(self, experts: nn.Module, router_weight: torch.Tensor, top_k: int, norm_topk_prob: bool = True):
        super().__init__()
        num_experts, hidden = experts.down_proj.shape[:2]
        inter = experts.down_proj.shape[2]
        self.num_experts, self.top_k, self.norm_topk_prob = num_experts, top_k, norm_topk_prob
        self.gate = nn.Linear(hidden, num_experts, bias=False, device=router_weight.device,
                              dtype=experts.down_proj.dtype)
        with torch.no_grad():
            self.gate.weight.copy_(router_weight)
        self.gate.weight.requires_grad_(False)
        gate_up, down = experts.gate_up_proj.detach(), experts.down_proj.detach()
        self.experts = nn.ModuleList(
            Qwen3MoeMLP(gate_up[e, :inter], gate_up[e, inter:], down[e], experts.act_fn) for e in range(num_experts)
        )

    def route(self, router_logits: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        weights = torch.softmax(router_logits, dim=1, dtype=torch.float)
        weights, selected = torch.topk(weights, self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights.to(dtype), selected

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch, seq, hidden = hidden_states.shape
        flat = hidden_states.view(-1, hidden)
        router_logits = self.gate(flat)
        weights, selected = self.route(router_logits, flat.dtype)
        out = torch.zeros_like(flat)
        expert_mask = nn.functional.one_hot(selected, num_classes=self.num_experts).permute(2, 1, 0)
        for expert_idx in torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero():
            slot, token = torch.where(expert_mask[expert_idx[0]])
            current = self.experts[int(expert_idx[0])](flat[token]) * weights[token, slot, None]
            out.index_add_(0, token, current.to(out.dtype))
        return out.view(batch, seq, hidden), router_logits


class OneLayerModel(nn.Module):
    """Container so that upstream's layer-number regex (``\\d+`` in the module name) finds ``layers.0``."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.layers = nn.ModuleList([block])


def observed_layer(experts: nn.Module, router_weight: torch.Tensor, top_k: int):
    """``(model, observer)``: the stand-in block hooked by upstream's observer as ``reap.main``'s default
    command sets it up for Qwen3 (cosine distance, router weights renormalised since ``norm_topk_prob``,
    merging statistics recorded: ``record_pruning_metrics_only=False``)."""
    observer_module = load_observer()
    model = OneLayerModel(Qwen3MoeSparseMoeBlock(experts, router_weight, top_k)).eval()
    config = observer_module.Qwen3MoEObserverHookConfig(
        distance_measure="cosine", renormalize_router_weights=True, record_pruning_metrics_only=False
    )
    return model, observer_module.MoETransformerObserver(model=model, hook_config=config)
