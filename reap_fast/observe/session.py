"""Observation of a loaded model: the model's own forward computes the REAP statistics.

``Observer`` switches the model's experts implementation to a reap-fast engine and gives every MoE
experts module a probe (its layer's accumulator and gate function). The experts function receives the
routed tokens and computes the layer output and the statistics together. The one forward hook: with an
engine that computes REAP's gate from router logits (Triton), a softmax-gate router's hook hands the
logits it returned to its layer's probe, so the gate costs no second router GEMM.
The token mask (padding and packing separators excluded) is handed to the probes for each forward
call by the observer that runs it, never through a module-level global. Families whose experts have no
experts interface because the routing weight scales the expert input (Llama-4) get their MoE block's
forward replaced for the observation instead (``input_scaled.py``).

The loop over a calibration set (progress, checkpoints, streaming, torchrun) is
:func:`reap_fast.observe.observe_checkpoint`'s; ``Observer`` observes one batch per :meth:`Observer.forward`.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from ..config.observe import RENORMALIZE_ALWAYS  # Observer(renormalize=...): g renormalised for every family
from ..metrics import LayerAccumulator, LayerMetrics
from ..models import MoEAdapter, MoELayer, UnsupportedModelError, find_moe_layers, get_adapter, text_config
from .engines import get_engine, register_engine
from .input_scaled import input_scaled_moe_forward
from .merging import add_merging_statistics, router_logits


class LayerProbe:
    """What one experts module needs to observe: its accumulator, gate function and observer."""

    def __init__(self, layer: MoELayer, gate_fn, accumulator: LayerAccumulator, observer: "Observer") -> None:
        self.layer = layer
        self.gate_fn = gate_fn
        self.accumulator = accumulator
        self.observer = observer
        self.router_logits: torch.Tensor | None = None  # what the router returned in this forward call

    def capture_router_logits(self, router: nn.Module, args, output) -> None:
        """Forward hook of a softmax-gate router: keep the logits (the first output) for :meth:`observe`."""
        self.router_logits = output[0] if isinstance(output, tuple) else output

    def gates(self, engine, hidden_states, top_k_index, top_k_weights):
        """REAP's g: from the router's own logits where the engine computes it (no second router GEMM),
        else the adapter's gate function."""
        logits, self.router_logits = self.router_logits, None
        make_gate = getattr(engine, "router_gate", None)
        if make_gate is not None and logits is not None and logits.shape == (top_k_index.shape[0], self.layer.num_experts):
            return make_gate(logits, self.observer.renormalize)
        return self.gate_fn(hidden_states, top_k_index, top_k_weights)

    def observe(self, engine, experts: nn.Module, hidden_states, top_k_index, top_k_weights) -> torch.Tensor:
        token_mask = self.observer.token_mask_for(hidden_states.shape[0], self.layer)
        with torch.no_grad():
            gates = self.gates(engine, hidden_states, top_k_index, top_k_weights)
        # the engine adds the statistics into the accumulator (the Triton engine in its statistics kernel)
        output, _ = engine(experts, hidden_states, top_k_index, top_k_weights, gates, token_mask, self.accumulator)
        if self.accumulator.merging is not None:
            logits = router_logits(self.layer.router, hidden_states, self.observer.adapter.router_fp32)
            add_merging_statistics(self.accumulator.merging, experts, hidden_states, top_k_index, token_mask, logits)
        return output


class Observer:
    """Observe REAP statistics through a model's forward.

    Example::

        with Observer(model, engine="reference") as observer:
            observer.forward(batch.input_ids, batch.attention_mask, batch.stats_mask)
        metrics = observer.metrics()  # {layer: {upstream keys}}

    ``merging=True`` also records upstream's five merging statistics (:mod:`reap_fast.observe.merging`).
    """

    def __init__(
        self, model: nn.Module, engine: str = "reference", renormalize: bool | str = True, merging: bool = False
    ) -> None:
        self.model = model
        self.adapter: MoEAdapter = get_adapter(model.config)
        self.layers: list[MoELayer] = find_moe_layers(model)
        if not self.layers:
            raise UnsupportedModelError(
                f"no MoE blocks with fused experts found in {model.__class__.__name__} ({self.adapter.family})"
            )
        self.engine = engine
        get_engine(engine)  # fail early with a clear message
        # True: renormalise only where the model itself renormalises its top-k weights (norm_topk_prob, or a
        # router that always does, as Mixtral's and Qwen3.5's); "always": whatever the model does (the
        # caller decided, e.g. upstream's rule); False: never.
        if renormalize == RENORMALIZE_ALWAYS:
            self.renormalize = True
        elif isinstance(renormalize, bool):
            self.renormalize = renormalize and self.adapter.model_renormalizes(model.config)
        else:
            raise ValueError(f"renormalize must be True, False or {RENORMALIZE_ALWAYS!r}, got {renormalize!r}")
        device = self.layers[0].experts.down_proj.device
        self.hidden_size = int(text_config(model.config).hidden_size) if merging else None
        self.accumulators = {
            layer.layer_index: self.new_accumulator(layer, layer.experts.down_proj.device) for layer in self.layers
        }
        self._device = device
        self._token_mask: torch.Tensor | None = None
        self._previous_implementation: dict | None = None
        self._router_hooks: list = []

    def new_accumulator(self, layer: MoELayer, device: torch.device) -> LayerAccumulator:
        """An empty accumulator for ``layer`` on ``device`` (with merging sums when the observer records them)."""
        return LayerAccumulator(layer.num_experts, device, self.hidden_size)

    def __enter__(self) -> "Observer":
        key = register_engine(self.engine)
        self._previous_implementation = self.model.get_experts_implementation()
        self.model.set_experts_implementation(key)
        for layer in self.layers:
            gate_fn = self.adapter.gate_function(layer, self.model.config, self.renormalize)
            probe = LayerProbe(layer, gate_fn, self.accumulators[layer.layer_index], self)
            object.__setattr__(layer.experts, "_reap_probe", probe)
            if self._router_logits_usable(layer):
                self._router_hooks.append(layer.router.register_forward_hook(probe.capture_router_logits))
            if self.adapter.expert_input_scaled:  # no experts interface: the block's forward is replaced
                forward = functools.partial(input_scaled_moe_forward, layer.block, probe, get_engine(self.engine))
                object.__setattr__(layer.block, "forward", forward)
        return self

    def _router_logits_usable(self, layer: MoELayer) -> bool:
        """Whether g can come from the router's returned logits: a softmax gate whose logits are the router's
        first output (every softmax family but Llama-4's input-scaled experts), with an engine that takes them."""
        return (getattr(get_engine(self.engine), "router_gate", None) is not None and self.adapter.gate_mode == "softmax"
                and not self.adapter.expert_input_scaled and isinstance(layer.router, nn.Module))

    def __exit__(self, *exc_info) -> None:
        for hook in self._router_hooks:
            hook.remove()
        self._router_hooks = []
        for layer in self.layers:
            if "_reap_probe" in layer.experts.__dict__:
                object.__delattr__(layer.experts, "_reap_probe")
            if "forward" in layer.block.__dict__:
                object.__delattr__(layer.block, "forward")
        if self._previous_implementation is not None:
            self.model.set_experts_implementation(self._previous_implementation)
        self._token_mask = None

    def token_mask_for(self, num_tokens: int, layer: MoELayer) -> torch.Tensor | None:
        """The current forward call's flattened statistics mask, checked against the layer's tokens."""
        mask = self._token_mask
        if mask is None:
            return None
        if mask.numel() != num_tokens:
            raise ValueError(
                f"layer {layer.layer_index} received {num_tokens} tokens but the statistics mask has {mask.numel()}"
            )
        return mask.to(layer.experts.down_proj.device)  # no copy unless the model is spread over devices

    @torch.no_grad()
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        stats_mask: torch.Tensor | None = None,
    ) -> None:
        """Run one batch through the model; tokens where ``stats_mask`` is False are not counted.

        ``stats_mask`` defaults to ``attention_mask`` (padding excluded).
        """
        if stats_mask is None and attention_mask is not None:
            stats_mask = attention_mask.bool()
        self._token_mask = None if stats_mask is None else stats_mask.reshape(-1).to(self._device, torch.bool)
        try:
            self.model(
                input_ids=input_ids.to(self._input_device()),
                attention_mask=None if attention_mask is None else attention_mask.to(self._input_device()),
                use_cache=False,
                logits_to_keep=1,
            )
        finally:
            self._token_mask = None

    def _input_device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    def metrics(self) -> dict[int, LayerMetrics]:
        """The statistics so far, in upstream REAP's format."""
        return {index: acc.to_upstream() for index, acc in sorted(self.accumulators.items())}
