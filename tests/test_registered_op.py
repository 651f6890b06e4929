"""``fused_moe`` as a registered custom op: opcheck, a fullgraph torch.compile of an observed MoE block, CUDA graphs.

On the CPU the op runs the kernels under the Triton interpreter (conftest.py); torch.compile uses the
``aot_eager`` backend (fake tensors trace the op through its fake implementation, no Inductor build).
The CUDA-graph test needs a GPU.
"""

from __future__ import annotations

import pytest
import torch

from reap_kernels.expert_stats import STATISTICS_DTYPES
from reap_kernels.registered import fused_moe_op
from reap_lab.tiny import build_model, tiny_qwen3_moe_config
from reap_fast.observe.session import Observer

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SILU = "0,0,silu,1.702,7.0"
GATES_GIVEN = 0


def op_inputs(num_tokens=16, num_experts=4, top_k=2, hidden=32, inter=16):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(num_tokens, hidden, generator=generator)
    w_gate_up = torch.randn(num_experts, 2 * inter, hidden, generator=generator) / hidden**0.5
    w_down = torch.randn(num_experts, hidden, inter, generator=generator) / inter**0.5
    weights, index = torch.softmax(torch.randn(num_tokens, num_experts, generator=generator), -1).topk(top_k, -1)
    mask = torch.arange(num_tokens) % 3 != 0
    return [tensor.to(DEVICE) for tensor in (x, w_gate_up, w_down, index, weights, mask)]


def accumulators(num_experts: int) -> list[torch.Tensor]:
    with torch.device(DEVICE):
        totals = [torch.zeros((), dtype=torch.int64)]
        totals += [torch.zeros(num_experts, dtype=dtype) for dtype in STATISTICS_DTYPES.values()]
        return totals + [torch.zeros(num_experts, num_experts, dtype=torch.int64)]


@pytest.mark.parametrize("mode", ["plain", "statistics", "accumulate", "router-logits"])
def test_opcheck(mode):
    """Schema, fake implementation, autograd registration and AOT dispatch (with the accumulators mutated)."""
    x, w_gate_up, w_down, index, weights, mask = op_inputs()
    routing, source = [index, weights, weights.clone(), mask], GATES_GIVEN
    if mode == "plain":
        routing = [index, weights, None, None]
    if mode == "router-logits":  # the REAP gate from (T, E) router logits, renormalised (gate_source 2)
        routing[2], source = torch.randn(16, 4, generator=torch.Generator().manual_seed(3)).to(DEVICE), 2
    totals = accumulators(4) if mode in ("accumulate", "router-logits") else []
    result = torch.library.opcheck(fused_moe_op, (x, [w_gate_up, w_down, None, None], routing, totals, SILU, None, source))
    assert set(result.values()) == {"SUCCESS"}, result


def observed_block_outputs(compile_block: bool):
    """Layer 0 of the tiny Qwen3-MoE model under Observer(engine='triton'), twice: output and statistics."""
    model = build_model(tiny_qwen3_moe_config(), seed=0).to(DEVICE)
    hidden = torch.randn(2, 11, model.config.hidden_size, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    with Observer(model, engine="triton") as observer:
        layer = observer.layers[0]
        block = torch.compile(layer.block, fullgraph=True, backend="aot_eager") if compile_block else layer.block
        observer._token_mask = (torch.arange(22) % 5 != 0).to(DEVICE)  # what Observer.forward sets per call
        with torch.no_grad():
            outputs = [block(hidden), block(hidden)]
        observer._token_mask = None
        return outputs, observer.metrics()[layer.layer_index]


def test_fullgraph_compile_of_an_observed_moe_block():
    """torch.compile(fullgraph=True) traces router, REAP gate, experts and statistics with no graph break, and
    computes the same bits as the eager block (same kernels, one opaque op)."""
    torch._dynamo.reset()
    eager_outputs, eager_metrics = observed_block_outputs(compile_block=False)
    compiled_outputs, compiled_metrics = observed_block_outputs(compile_block=True)
    for eager, compiled in zip(eager_outputs, compiled_outputs):
        assert torch.equal(eager, compiled)
    assert int(compiled_metrics["total_tokens"]) == 2 * 17
    for key, value in eager_metrics.items():
        assert torch.equal(value, compiled_metrics[key]), key


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_observed_layer_replays_bitwise_in_a_cuda_graph():
    """One observed MoE block captured in a CUDA graph: each replay gives the eager output bit for bit and adds
    the same statistics again (the accumulators are updated on the device, no host synchronisation)."""
    model = build_model(tiny_qwen3_moe_config(), seed=0).to("cuda")
    hidden = torch.randn(4, 64, model.config.hidden_size, device="cuda")
    with Observer(model, engine="triton") as observer:
        layer = observer.layers[0]
        accumulator = observer.accumulators[layer.layer_index]
        observer._token_mask = torch.arange(256, device="cuda") % 7 != 0
        with torch.no_grad():
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                eager = layer.block(hidden)  # compiles the kernels outside the capture
            torch.cuda.current_stream().wait_stream(stream)
            torch.cuda.synchronize()
            tokens_once = int(accumulator.total_tokens)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                captured = layer.block(hidden)
            for replay in range(1, 3):
                graph.replay()
                torch.cuda.synchronize()
                assert torch.equal(captured, eager)
                assert int(accumulator.total_tokens) == tokens_once * (replay + 1)
        observer._token_mask = None
