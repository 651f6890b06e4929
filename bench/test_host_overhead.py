"""Host time of one ``reap_kernels.fused_moe`` call with the kernel launches mocked: what Python costs per call.

The observer's call at the Qwen3-30B-A3B layer shape (E=128, k=8, H=2048, I=768, T=2048, bf16) with the
REAP gate from router logits, a token mask and a layer's accumulators. Tensors live on the ``meta``
device (allocations without memory or data; no CPU-only host checks run) and every Triton launch is
replaced by a no-op at ``kernel[grid]``, so the time is reap_kernels' own: the cached checks and config,
the allocations, the launch arguments. Triton's launcher (its argument binding and cache lookup) is not
included; it runs once per kernel on a GPU on top of this.

Target (issue 26): <= 15 us per call. This is a benchmark, not a timed test: it records the time
(``--benchmark-json``) and checks only that the five kernels were "launched" once each.
Run: ``pytest bench/test_host_overhead.py``.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction

import reap_kernels
from reap_kernels.expert_stats import STATISTICS_DTYPES

TARGET_US = 15.0
SHAPE = dict(E=128, k=8, H=2048, I=768, T=2048)


def observer_call_inputs():
    """The arguments of the observer's fused_moe call, on the meta device."""
    num_experts, top_k, hidden, inter, tokens = (SHAPE[key] for key in ("E", "k", "H", "I", "T"))
    with torch.device("meta"):
        args = (
            torch.empty(tokens, hidden, dtype=torch.bfloat16),
            torch.empty(num_experts, 2 * inter, hidden, dtype=torch.bfloat16),
            torch.empty(num_experts, hidden, inter, dtype=torch.bfloat16),
            torch.empty(tokens, top_k, dtype=torch.int64),
            torch.empty(tokens, top_k, dtype=torch.bfloat16),
        )
        accumulators = {name: torch.empty(num_experts, dtype=dtype) for name, dtype in STATISTICS_DTYPES.items()}
        accumulators.update(total_tokens=torch.empty((), dtype=torch.int64),
                            pairwise_expert_frequency=torch.empty(num_experts, num_experts, dtype=torch.int64))
        kwargs = dict(gates=reap_kernels.RouterGate(torch.empty(tokens, num_experts, dtype=torch.bfloat16), True),
                      token_mask=torch.empty(tokens, dtype=torch.bool), accumulators=accumulators)
    return args, kwargs


@pytest.fixture
def mocked_launches(monkeypatch):
    """Every ``kernel[grid](...)`` becomes a no-op that counts the launch."""
    launches: Counter = Counter()

    def getitem(self, grid):
        name = self.fn.__name__ if hasattr(self, "fn") else self.__name__

        def launch(*args, **kwargs):
            launches[name] += 1

        return launch

    for launcher in (JITFunction, InterpretedFunction):
        monkeypatch.setattr(launcher, "__getitem__", getitem)
    return launches


def test_fused_moe_host_overhead(benchmark, mocked_launches):
    args, kwargs = observer_call_inputs()
    reap_kernels.fused_moe(*args, **kwargs)  # the first call of a shape checks and looks up the config
    mocked_launches.clear()
    benchmark.extra_info.update(shape=SHAPE, dtype="bfloat16", variant="observer call, launches mocked",
                                target_us=TARGET_US)
    benchmark.pedantic(reap_kernels.fused_moe, args=args, kwargs=kwargs, rounds=200, iterations=50, warmup_rounds=5)
    kernels = {"_align_kernel", "_gate_up_kernel", "_down_proj_kernel", "_combine_kernel", "_expert_stats_kernel"}
    assert set(mocked_launches) == kernels and len(set(mocked_launches.values())) == 1  # each once per call
    assert min(mocked_launches.values()) >= 200 * 50
