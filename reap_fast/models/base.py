"""The adapter interface: what reap-fast needs to know about one MoE model family.

An adapter names the config keys of a family (expert count, top-k), how the router turns hidden
states into REAP's gate value g, which router tensors are sliced when experts are removed, how its
checkpoints name their tensors for layer streaming (:class:`StreamingLayout`) and what the Triton
kernels compute for its experts (:class:`KernelLayout`). Every part of reap-fast that depends on the
family reads it from the family's one entry in ``families.py``.
MoE blocks are found structurally: a module with an ``experts`` child holding fused 3-D expert weights
(``down_proj`` of shape (E, ., .)) and a router child (``gate`` or ``router``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ReapFastError

GateMode = Literal["softmax", "model_weights"]

_LAYER_INDEX = re.compile(r"layers\.(\d+)\.")


def text_config(config: Any) -> Any:
    """The config that holds the MoE keys: the nested text config of a multimodal wrapper, else ``config``."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


class UnsupportedModelError(ReapFastError, ValueError):
    """The model family has no adapter, or its structure is not what the adapter expects."""


@dataclass(frozen=True)
class MoELayer:
    """One MoE block of a loaded model."""

    layer_index: int  # decoder layer number (the key of the observation file)
    name: str  # module path, e.g. "model.layers.3.mlp"
    block: nn.Module
    experts: nn.Module  # fused experts module (gate_up_proj / down_proj parameters)
    router: nn.Module

    @property
    def num_experts(self) -> int:
        return int(self.experts.down_proj.shape[0])


# transformers' fused expert tensors and the per-expert checkpoint tensors they are stacked from, in order
# (concatenated on dim 1): gate_up_proj (E, 2I, H) = [stack(gate_proj); stack(up_proj)], down_proj = stack(down_proj)
FUSED_EXPERTS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("gate_up_proj", ("gate_proj", "up_proj")),
    ("down_proj", ("down_proj",)),
)


@dataclass(frozen=True)
class StreamingLayout:
    """How layer streaming (``observe/streaming/``) reads a family's safetensors checkpoint.

    renames: (module tensor name suffix, checkpoint key suffix) where transformers renames at load time.
    prefixes: (module path prefix, checkpoint prefix) under a decoder layer, e.g. Mixtral's MoE block
    ``mlp.`` is ``block_sparse_moe.`` in its checkpoints (applied before ``renames`` and expert fusing).
    fused_experts: each fused experts tensor of the module and the per-expert tensors
    (``...experts.<e>.<part>.weight``) it is built from, stacked over experts and concatenated on dim 1.
    model_types: the model types of the family whose checkpoints stream (empty: all of them);
    refusal: why the family's other model types do not (ends the error message).
    """

    renames: tuple[tuple[str, str], ...] = ()
    prefixes: tuple[tuple[str, str], ...] = ()
    fused_experts: tuple[tuple[str, tuple[str, ...]], ...] = FUSED_EXPERTS
    model_types: tuple[str, ...] = ()
    refusal: str = ""


@dataclass(frozen=True)
class KernelLayout:
    """What the Triton kernels compute for a family's experts (``observe/triton_engine.py``).

    activation: the kernels' gated activation: ``"silu"`` (silu(gate) * up) or ``"gpt_oss_swiglu"``
    (clamped swiglu with ``alpha`` and ``limit``).
    gate_class: the experts class whose own ``_apply_gate`` computes ``activation``; None for
    transformers' default gate (``act_fn(gate) * up``, the module's ``act_fn`` must be SiLU).
    interleaved: the gate reads gate and up columns alternately (gate0, up0, gate1, ...) rather than
    as [gate; up] halves.
    constants: experts attributes handed to the kernels as floats, under the same names.
    """

    activation: Literal["silu", "gpt_oss_swiglu"] = "silu"
    gate_class: str | None = None
    interleaved: bool = False
    constants: tuple[str, ...] = ()


@dataclass(frozen=True)
class MoEAdapter:
    """Facts about one MoE family. See ``families.py`` for the registered ones.

    gate_mode:
      * ``"softmax"``: g = softmax over all router logits (fp32) at the chosen experts, divided by
        their sum when renormalisation is on (upstream REAP's definition);
      * ``"model_weights"``: g = the model's own top-k routing weight with ``routed_scaling_factor``
        divided out (sigmoid routers with score-correction bias: the bias only selects experts),
        divided by the top-k sum when renormalisation is on.

    router_fp32: the router computes its logits in fp32 from fp32 casts of its input and weight
    (ERNIE-4.5, DeepSeek-V2); the softmax gate then does the same, so g sees the model's own logits.
    expert_input_scaled: the routing weight multiplies the expert's *input*, not its output, and the
    experts module has no experts interface (Llama-4); observation then replaces the MoE block's
    forward (see ``reap_fast/observe/input_scaled.py``).
    router_tensors: names under the router module (dotted for submodules, e.g. ERNIE's
    ``moe_statics.e_score_correction_bias`` of shape (1, E)); each is sliced on its expert dimension.
    count keys (``num_experts_key``, ``extra_count_keys``: set to the new count), top-k keys
    (``top_k_key``, ``extra_top_k_keys``: clamped to it) and ``expert_list_keys`` (lists whose every
    entry upstream REAP sets to the new count, e.g. ERNIE's ``moe_capacity``) are what a pruned
    ``config.json`` edits, as ``config.json`` spells them.
    streaming: None when layer streaming is not checked exact for the family (it is refused).
    """

    family: str
    model_types: tuple[str, ...]
    num_experts_key: str
    top_k_key: str = "num_experts_per_tok"
    gate_mode: GateMode = "softmax"
    renormalize_key: str | None = "norm_topk_prob"  # config flag telling whether the model renormalises top-k
    always_renormalizes: bool = False  # the router renormalises regardless of config (Mixtral, Qwen3.5)
    router_tensors: tuple[str, ...] = ("weight",)  # router parameters/buffers indexed by expert on dim 0
    scaling_factor_key: str | None = None  # e.g. "routed_scaling_factor"
    group_keys: tuple[str, str] | None = None  # (n_group, topk_group) for group-limited routing
    notes: str = ""
    extra_count_keys: tuple[str, ...] = field(default_factory=tuple)  # other config keys holding E
    extra_top_k_keys: tuple[str, ...] = ()  # other config keys holding k (clamped to the new count)
    expert_list_keys: tuple[str, ...] = ()  # config lists whose every entry is set to the new count
    router_fp32: bool = False
    expert_input_scaled: bool = False
    streaming: StreamingLayout | None = StreamingLayout()
    kernel: KernelLayout = KernelLayout()

    @property
    def count_keys(self) -> tuple[str, ...]:
        """The config keys holding the expert count E."""
        return (self.num_experts_key, *self.extra_count_keys)

    @property
    def top_k_keys(self) -> tuple[str, ...]:
        """The config keys holding the top-k."""
        return (self.top_k_key, *self.extra_top_k_keys)

    def model_renormalizes(self, config) -> bool:
        """Whether the model itself renormalises its top-k weights."""
        if self.always_renormalizes:
            return True
        if self.renormalize_key is None:
            return False
        return bool(getattr(text_config(config), self.renormalize_key, False))

    def routed_scaling_factor(self, config) -> float:
        if self.scaling_factor_key is None:
            return 1.0
        return float(getattr(text_config(config), self.scaling_factor_key, 1.0) or 1.0)

    def gate_function(self, layer: MoELayer, config, renormalize: bool) -> Callable[..., torch.Tensor]:
        """A function (hidden_states, top_k_index, top_k_weights) -> g as fp32 (T, k)."""
        if self.gate_mode == "softmax":
            return _softmax_gate(layer.router, renormalize, self.router_fp32)
        return _model_weight_gate(self.routed_scaling_factor(config), renormalize)


def _renormalize(gates: torch.Tensor) -> torch.Tensor:
    """Divide by the top-k sum and clamp to fp32 eps, as upstream REAP does."""
    gates = gates / gates.sum(dim=-1, keepdim=True)
    return gates.clamp(min=torch.finfo(torch.float32).eps)


def _softmax_gate(router: nn.Module, renormalize: bool, fp32: bool = False) -> Callable[..., torch.Tensor]:
    def gate(hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        # The same op the router ran, so the logits are bit-identical to the model's own.
        weight, bias = router.weight, getattr(router, "bias", None)
        if fp32:
            hidden_states, weight = hidden_states.float(), weight.float()
            bias = None if bias is None else bias.float()
        logits = F.linear(hidden_states, weight, bias)
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        gates = probs.gather(1, top_k_index.long())
        return _renormalize(gates) if renormalize else gates

    return gate


def _model_weight_gate(scale: float, renormalize: bool) -> Callable[..., torch.Tensor]:
    def gate(hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        gates = top_k_weights.to(torch.float32) / scale
        return _renormalize(gates) if renormalize else gates

    return gate


def router_tensor(router: nn.Module, name: str) -> torch.Tensor | None:
    """The router parameter or buffer ``name`` (dotted for submodules), or None when absent."""
    owner_path, _, leaf = name.rpartition(".")
    owner = router
    for part in owner_path.split(".") if owner_path else ():
        owner = getattr(owner, part, None)
        if owner is None:
            return None
    value = getattr(owner, leaf, None)
    return value if isinstance(value, torch.Tensor) else None


def expert_dim(tensor: torch.Tensor, num_experts: int) -> int:
    """The dimension of a router tensor that indexes experts: dim 0, else the only one of size E."""
    if tensor.dim() > 0 and tensor.shape[0] == num_experts:
        return 0
    dims = [d for d, size in enumerate(tensor.shape) if size == num_experts]
    if len(dims) != 1:
        raise UnsupportedModelError(
            f"cannot tell which dimension of a {tuple(tensor.shape)} router tensor indexes {num_experts} experts"
        )
    return dims[0]


def find_moe_layers(model: nn.Module) -> list[MoELayer]:
    """All MoE blocks of ``model`` with fused experts, in layer order."""
    layers = []
    for name, module in model.named_modules():
        experts = getattr(module, "experts", None)
        router = getattr(module, "gate", None) if hasattr(module, "gate") else getattr(module, "router", None)
        if experts is None or router is None or not isinstance(router, nn.Module):
            continue
        down = getattr(experts, "down_proj", None)
        if not isinstance(down, torch.Tensor) or down.dim() != 3:
            continue
        match = _LAYER_INDEX.search(name + ".")
        if match is None:
            raise UnsupportedModelError(f"cannot read a layer number from MoE block name {name!r}")
        layers.append(MoELayer(int(match.group(1)), name, module, experts, router))
    return sorted(layers, key=lambda layer: layer.layer_index)
