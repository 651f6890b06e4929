"""Launch counts, host synchronisation and device placement of the Triton engine (CPU, interpreter).

Launches are counted as a GPU would see them: every aten op that runs a kernel (a
``TorchDispatchMode`` sees all of them; views, empty allocations and metadata ops launch nothing)
plus every Triton kernel launch. Ops that force a host synchronisation on a GPU (``.item()``,
``nonzero``, ``torch.tensor`` from Python data, ...) are recorded separately and must not occur.
The budgets (issue 26): at most 7 launches per ``fused_moe`` call with statistics (5 Triton kernels, the
zero fill of the fresh token counter) and 10 per observed MoE block: the model's own router (linear,
softmax, topk, and the top-k renormalisation's sum and division: 5) plus alignment, gate_up, down, combine
(which also computes REAP's gate from the router logits the model returned) and statistics.
"""

from __future__ import annotations

import contextlib
from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction

import reap_kernels
from reap_kernels import moe as kernels_moe
from reap_fast.observe.session import Observer
from reap_lab.tiny import build_model, tiny_qwen3_moe_config

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
LAUNCHER = InterpretedFunction if reap_kernels.INTERPRET else JITFunction  # whose .run launches a kernel
FUSED_MOE_BUDGET = 7
MOE_LAYER_BUDGET = 10
TRITON_KERNELS = {"triton:_align_kernel", "triton:_gate_up_kernel", "triton:_down_proj_kernel", "triton:_combine_kernel",
                  "triton:_expert_stats_kernel"}
aten = torch.ops.aten
NO_LAUNCH = {  # allocations without initialisation, views and metadata: no kernel on a GPU
    aten.empty.memory_format, aten.empty_strided.default, aten.empty_like.default, aten.view.default,
    aten._unsafe_view.default, aten._reshape_alias.default, aten.reshape.default, aten.unsqueeze.default,
    aten.squeeze.dim, aten.squeeze.default, aten.expand.default, aten.as_strided.default, aten.t.default,
    aten.transpose.int, aten.permute.default, aten.detach.default, aten.alias.default, aten.slice.Tensor,
    aten.select.int, aten.split.Tensor, aten.split_with_sizes.default, aten.unbind.int, aten.chunk.default,
    aten.sym_size.int, aten.sym_stride.int, aten.sym_numel.default, aten.is_same_size.default,
    aten.promote_types.default,
}
HOST_SYNC = {  # read a device value on the host, or copy host data to the device
    aten._local_scalar_dense.default, aten.nonzero.default, aten.masked_select.default, aten.lift_fresh.default,
    aten.unique_consecutive.default, aten._unique2.default, aten.equal.default, aten.is_nonzero.default,
}


class LaunchCounter(TorchDispatchMode):
    """Counts the aten ops that launch GPU kernels and the ones that synchronise with the host."""

    def __init__(self) -> None:
        super().__init__()
        self.launches: Counter = Counter()
        self.syncs: Counter = Counter()
        self.in_triton = False  # the interpreter's own tensor handling inside a launch is not counted

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.in_triton:
            pass
        elif func in HOST_SYNC:
            self.syncs[str(func)] += 1
        elif func not in NO_LAUNCH:
            self.launches[str(func)] += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def counting():
    """Count aten launches and Triton kernel launches inside the block."""
    counter = LaunchCounter()
    original = LAUNCHER.run

    def counted_run(self, *args, **kwargs):
        counter.launches[f"triton:{self.fn.__name__}"] += 1
        counter.in_triton = True
        try:
            return original(self, *args, **kwargs)
        finally:
            counter.in_triton = False

    LAUNCHER.run = counted_run
    try:
        with counter:
            yield counter
    finally:
        LAUNCHER.run = original


def total(counter: LaunchCounter) -> int:
    return sum(counter.launches.values())


def layer_inputs(num_tokens=40, num_experts=8, top_k=2, hidden=32, inter=16, seed=0, device=DEVICE):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, hidden, generator=generator)
    w_gate_up = torch.randn(num_experts, 2 * inter, hidden, generator=generator) / hidden**0.5
    w_down = torch.randn(num_experts, hidden, inter, generator=generator) / inter**0.5
    logits = torch.randn(num_tokens, num_experts, generator=generator)
    weights, index = torch.softmax(logits, -1).topk(top_k, dim=-1)
    return tuple(tensor.to(device) for tensor in (x, w_gate_up, w_down, index, weights))


@pytest.mark.parametrize("accumulate", [False, True], ids=["fresh", "accumulate"])
@pytest.mark.parametrize("masked", [False, True], ids=["all", "masked"])
def test_fused_moe_with_statistics_launch_budget(masked, accumulate):
    x, w_gate_up, w_down, index, weights = layer_inputs()
    gates = weights.clone()
    mask = torch.arange(40, device=DEVICE) % 5 != 0 if masked else None
    accumulators = None
    if accumulate:
        with torch.device(DEVICE):
            accumulators = {name: torch.zeros(8, dtype=dtype) for name, dtype in reap_kernels.expert_stats.STATISTICS_DTYPES.items()}
            accumulators.update(total_tokens=torch.zeros((), dtype=torch.int64),
                                pairwise_expert_frequency=torch.zeros(8, 8, dtype=torch.int64))
    with counting() as counter:
        reap_kernels.fused_moe(x, w_gate_up, w_down, index, weights, gates=gates, token_mask=mask, accumulators=accumulators)
    assert not counter.syncs, f"host synchronisation: {dict(counter.syncs)}"
    assert total(counter) <= FUSED_MOE_BUDGET, dict(counter.launches)
    triton_launches = {name for name in counter.launches if name.startswith("triton:")}
    assert triton_launches == TRITON_KERNELS and all(counter.launches[name] == 1 for name in TRITON_KERNELS)


def test_moe_layer_launch_budget():
    """One MoE block forward under Observer(engine='triton'): the model's router, then 5 Triton launches and
    nothing else (no second router GEMM: the gate comes from the router's logits; no accumulation ops)."""
    model = build_model(tiny_qwen3_moe_config(), seed=0).to(DEVICE)
    input_ids = torch.randint(0, 256, (2, 11), generator=torch.Generator().manual_seed(1))
    attention_mask = torch.ones(2, 11, dtype=torch.long)
    attention_mask[1, 8:] = 0
    input_ids, attention_mask = input_ids.to(DEVICE), attention_mask.to(DEVICE)
    per_block: list[LaunchCounter] = []
    active: list = []

    def start(module, args):
        active.append(counting())
        per_block.append(active[-1].__enter__())

    def stop(module, args, output):
        active.pop().__exit__(None, None, None)

    with Observer(model, engine="triton") as observer:
        layers = observer.layers
        hooks = [hook for layer in layers for hook in (layer.block.register_forward_pre_hook(start),
                                                       layer.block.register_forward_hook(stop))]
        observer.forward(input_ids, attention_mask)
        for hook in hooks:
            hook.remove()
    assert len(per_block) == len(layers) == 2
    for counter in per_block:
        assert not counter.syncs, f"host synchronisation: {dict(counter.syncs)}"
        assert total(counter) <= MOE_LAYER_BUDGET, str(sorted(counter.launches.items()))
        assert {name: n for name, n in counter.launches.items() if name.startswith("triton:")} == dict.fromkeys(TRITON_KERNELS, 1)
        assert counter.launches["aten.mm.default"] == 1  # the router's own linear only
    assert int(observer.metrics()[layers[0].layer_index]["total_tokens"]) == 19  # the statistics still arrive


def test_launches_run_on_the_tensors_device(monkeypatch):
    """Every Triton launch happens inside ``torch.cuda.device(<the tensors' device>)`` (mocked: no GPU here)."""
    entered: list = []
    active: list = []

    @contextlib.contextmanager
    def fake_guard(device):
        entered.append(device)
        active.append(device)
        try:
            yield
        finally:
            active.pop()

    launches_outside = []
    original = LAUNCHER.run

    def checked_run(self, *args, **kwargs):
        if not active:
            launches_outside.append(self.fn.__name__)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(kernels_moe, "device_guard", fake_guard)
    monkeypatch.setattr(LAUNCHER, "run", checked_run)
    x, w_gate_up, w_down, index, weights = layer_inputs()
    reap_kernels.fused_moe(x, w_gate_up, w_down, index, weights, gates=weights.clone())
    assert entered == [x.device] and not launches_outside


def test_device_guard_selects_the_tensors_cuda_device():
    guard = kernels_moe.device_guard(torch.device("cuda", 1))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1  # constructing it needs no GPU
    assert not isinstance(kernels_moe.device_guard(torch.device("cpu")), torch.cuda.device)


def test_config_lookup_uses_the_tensors_device(monkeypatch, tmp_path):
    """get_config(device=cuda:1) reads cuda:1's name and capability, not the current device's."""
    import json

    from reap_kernels import config as kconfig

    asked = []
    monkeypatch.setattr(kconfig, "INTERPRET", False)
    monkeypatch.setattr(kconfig, "CONFIG_DIR", tmp_path)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: asked.append(("name", device)) or "Card B")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: asked.append(("capability", device)) or (8, 6))
    entry = {"block_m": 32, "gate_up": {"block_n": 32, "block_k": 32}, "down": {"block_n": 32, "block_k": 32}}
    (tmp_path / "sm_86.json").write_text(json.dumps({"arch": 86, "entries": [{"match": {"E": 4}, "T": 64, "config": entry}]}))
    (tmp_path / "default.json").write_text(json.dumps({"entries": [{"match": {}, "T": 64, "config": {**entry, "block_m": 16}}]}))
    device = torch.device("cuda", 1)
    assert kconfig.get_config(4, 32, 32, 2, 64, torch.bfloat16, device=device).block_m == 32  # the sm_86 file
    assert asked == [("name", device), ("capability", device)]
    assert kconfig.get_config(5, 32, 32, 2, 64, torch.bfloat16, device=device).block_m == 16  # default.json
    (tmp_path / "Card_B.json").write_text(json.dumps({"entries": [{"match": {}, "T": 64, "config": {**entry, "block_m": 64}}]}))
    kconfig._load_entries.cache_clear()
    assert kconfig.get_config(4, 32, 32, 2, 64, torch.bfloat16, device=device).block_m == 64  # the device's own file


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_no_host_synchronisation_on_cuda():
    x, w_gate_up, w_down, index, weights = layer_inputs(num_tokens=300)
    mask = torch.arange(300, device=DEVICE) % 7 != 0
    reap_kernels.fused_moe(x, w_gate_up, w_down, index, weights, gates=weights.clone(), token_mask=mask)  # compile first
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        reap_kernels.fused_moe(x, w_gate_up, w_down, index, weights, gates=weights.clone(), token_mask=mask)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_second_device_computes_the_same_bits_while_device_0_is_current():
    inputs = layer_inputs(num_tokens=300)
    first = reap_kernels.fused_moe(*inputs, gates=inputs[-1].clone())
    other = tuple(tensor.to("cuda:1") for tensor in inputs)
    torch.cuda.set_device(0)
    second = reap_kernels.fused_moe(*other, gates=other[-1].clone())
    assert second[0].device == torch.device("cuda", 1)
    assert torch.equal(first[0], second[0].to("cuda:0"))
    for key, value in first[1].items():
        assert torch.equal(value, second[1][key].to("cuda:0")), key
