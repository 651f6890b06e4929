"""REAP's gate from the router logits the model already computed, in place of a (T, k) gate tensor.

Pass ``RouterGate(logits, renormalize)`` as ``fused_moe(..., gates=...)``: the combine kernel (one program
per token) computes, for each of the token's k routed pairs,

    g = softmax(logits[t], fp32)[top_k_index[t, slot]]       (exp(l - max) / sum exp(l - max) over E)
    g = max(g / sum_slot g, eps_fp32)                         when ``renormalize`` (upstream REAP's rule)

and stores it for the statistics kernel, so observation needs no second router GEMM and no softmax,
gather, sum, division or clamp of its own. The values equal the PyTorch gate (``softmax(F.linear(x, W_r),
dtype=float32).gather(...)``) up to the rounding of ``exp`` and the order of the E-long sum: a few fp32
ulps.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True, eq=False)
class RouterGate:
    """The router's logits (T, E), any float dtype and strides, and whether g is renormalised over top k."""

    logits: torch.Tensor
    renormalize: bool

    @property
    def shape(self) -> torch.Size:
        return self.logits.shape

    @property
    def dtype(self) -> torch.dtype:
        return self.logits.dtype

    @property
    def device(self) -> torch.device:
        return self.logits.device

    def source(self) -> int:
        """The op's ``gate_source`` code: 1 softmax, 2 softmax renormalised over the top k."""
        return 2 if self.renormalize else 1

    @staticmethod
    def from_source(logits: torch.Tensor, source: int) -> "RouterGate | torch.Tensor":
        """Inverse of :meth:`source` (0: ``logits`` is a gate tensor already)."""
        return logits if source == 0 else RouterGate(logits, renormalize=source == 2)
