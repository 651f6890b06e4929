"""One MoE layer, several ways: what REAP observation costs on top of the plain forward.

Variants (all on the same routed inputs, statistics mask with ~10 % padding):

    upstream_hook      the stock forward + Cerebras REAP's observer hook (every expert on every token
                       into an (E, T, H) fp32 buffer, then a Python loop over experts with host syncs)
    upstream_observer  upstream REAP's own src/reap/observer.py (MoETransformerObserver, Qwen3 hook config as
                       its default command sets it: cosine, renormalised router weights, merging statistics
                       recorded) hooked on a transformers-4.55-shaped stand-in block (bench/upstream_observer.py:
                       router + ModuleList of SwiGLU experts viewing the same fused weights; its output is
                       asserted equal to the fused layer's before timing). Upstream's code is exported from
                       the git snapshot at run time (REAP_UPSTREAM_GIT); skipped when there is none. Timed:
                       the stand-in's eager forward + upstream's hook (pruning and merging statistics).
                       Slow: ~40-60 s a call at the real shape, T=256, fp32 on a shared 2-core CPU.
    liger_fused        Liger-Kernel's fused MoE (liger_kernel.ops.fused_moe.LigerFusedMoEFunction, Triton,
                       no observation); skipped when liger_kernel does not import or its kernels do not run
                       (GPU only: under the CPU interpreter Triton finds no driver)
    hf_fastest         transformers' fastest experts implementation, no observation (grouped_mm where
                       available, else batched_mm, else the module's eager loop)
    hf_eager           the experts module's own eager per-expert loop (transformers' default forward)
    grouped_mm         transformers' grouped_mm experts function (skipped where it does not run)
    batched_mm         transformers' batched_mm, only where its (T*k, 2I, H) weight gather fits in half
                       the free GPU memory (~77 GB at T=2048 for this shape: skipped on an 80 GB card)
    reference_stats    reap_fast's reference engine with statistics
    triton_stats       reap_fast's Triton engine with statistics
    triton_plain       the Triton engine without statistics (a plain fused MoE forward)

On a GPU: the Qwen3-30B-A3B layer (E=128, k=8, H=2048, I=768) in bf16 at T=2048 and 8192. On a
CPU-only machine the Triton kernels run under TRITON_INTERPRET=1 (numpy, very slow): only a tiny
shape (E=8, k=2, H=64, I=32, T=64, fp32) is timed, to check that the suite runs, never for speed.
With REAP_BENCH_REAL_SHAPE=1 on a CPU, the real layer shape at T=256 in fp32 is timed for the
PyTorch variants only (upstream hook, transformers, reference engine): ratios, not GPU figures.

Each result's ``extra_info`` carries the achieved GB/s and TFLOP/s of the routed work and its fraction of
the device's roofline (``bench/roofline.py``).

Run: ``pytest bench/test_moe_layer.py --benchmark-json=bench/results/moe_layer.json``. Without
pytest-benchmark: ``python bench/test_moe_layer.py --json out.json`` (a simple timer, same variants).
"""

from __future__ import annotations

import json
import os
import sys
import time
from functools import lru_cache

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # also when run as a script (conftest not loaded)

from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

from roofline import throughput

from reap_fast.observe.reference import reference_experts_forward
from reap_fast.observe.triton_engine import triton_experts_forward
from reap_lab.tiny import tiny_qwen3_moe_config

CUDA = torch.cuda.is_available()
if CUDA:
    SHAPE = dict(E=128, k=8, H=2048, I=768)
    TOKENS = [2048, 8192]
    DTYPE = torch.bfloat16
    ROUNDS = {"upstream_hook": 3, "upstream_observer": 3}
    DEFAULT_ROUNDS = 20
else:
    SHAPE = dict(E=8, k=2, H=64, I=32)
    TOKENS = [64]
    DTYPE = torch.float32
    ROUNDS = {}
    DEFAULT_ROUNDS = 2
DEVICE = "cuda" if CUDA else "cpu"
VARIANTS = ["upstream_hook", "upstream_observer", "liger_fused", "hf_fastest", "hf_eager", "grouped_mm", "batched_mm", "reference_stats", "triton_stats",
            "triton_plain"]
if not CUDA and os.environ.get("REAP_BENCH_REAL_SHAPE") == "1":
    # The real layer shape on the CPU, PyTorch variants only (interpreted Triton says nothing about speed):
    # measures what routed-only observation saves over upstream's all-experts hook, as a ratio.
    SHAPE = dict(E=128, k=8, H=2048, I=768)
    TOKENS = [256]
    ROUNDS = {"upstream_hook": 2, "upstream_observer": 1}  # upstream_observer: ~40-60 s a call here (2 cores)
    DEFAULT_ROUNDS = 3
    VARIANTS = [variant for variant in VARIANTS
                if not variant.startswith(("triton", "liger")) and not variant.endswith("_mm")]


@lru_cache(maxsize=None)
def layer():
    config = tiny_qwen3_moe_config(
        hidden_size=SHAPE["H"], moe_intermediate_size=SHAPE["I"], num_experts=SHAPE["E"], num_experts_per_tok=SHAPE["k"]
    )
    with torch.device(DEVICE):
        experts = Qwen3MoeExperts(config)
    torch.manual_seed(0)
    with torch.no_grad():
        experts.gate_up_proj.normal_(0.0, 2 * SHAPE["H"] ** -0.5)
        experts.down_proj.normal_(0.0, 2 * SHAPE["I"] ** -0.5)
    return experts.to(DTYPE).eval()


@lru_cache(maxsize=None)
def inputs(num_tokens: int):
    return draw(num_tokens)[:6]


@lru_cache(maxsize=None)
def router_weight(num_tokens: int) -> torch.Tensor:
    """The (E, H) router the inputs were routed with (the stand-in block's ``gate`` for upstream_observer)."""
    return draw(num_tokens)[6]


@lru_cache(maxsize=None)
def draw(num_tokens: int):
    generator = torch.Generator(device=DEVICE).manual_seed(1)
    x = torch.randn(num_tokens, SHAPE["H"], device=DEVICE, generator=generator)
    router = torch.randn(SHAPE["E"], SHAPE["H"], device=DEVICE, generator=generator) * SHAPE["H"] ** -0.5
    logits = x @ router.T
    weights, index = torch.softmax(logits, -1).topk(SHAPE["k"], dim=-1)
    weights = weights / weights.sum(-1, keepdim=True)
    mask = torch.rand(num_tokens, device=DEVICE, generator=generator) > 0.1
    return x.to(DTYPE), index, weights.to(DTYPE), weights.float(), mask, logits.to(DTYPE), router.to(DTYPE)


def hf_fastest_name(experts, x, index, weights) -> str:
    """The fastest transformers experts implementation that runs here."""
    for name in ("grouped_mm", "batched_mm"):
        try:
            ALL_EXPERTS_FUNCTIONS[name](experts, x[:4], index[:4], weights[:4])
            return name
        except Exception:  # not available on this device / torch version
            continue
    return "eager"


def hf_forward(name, experts, x, index, weights):
    if name == "eager":
        return type(experts).forward.__wrapped__(experts, x, index, weights)
    return ALL_EXPERTS_FUNCTIONS[name](experts, x, index, weights)


def upstream_hook(experts, x, index, weights, mask, router_logits, hf_name):
    """Stock forward, then REAP's hook: every expert on every token, per-expert loop with host syncs."""
    out = hf_forward(hf_name, experts, x, index, weights)
    num_experts = experts.down_proj.shape[0]
    activations = torch.zeros((num_experts, *x.shape), device=x.device)  # fp32, as upstream
    for e in range(num_experts):
        h = experts._apply_gate(torch.nn.functional.linear(x, experts.gate_up_proj[e]))
        activations[e] = torch.nn.functional.linear(h, experts.down_proj[e])
    num_tokens = mask.sum().item()  # host sync
    selected, logits = index[mask], router_logits[mask]
    activations = activations[:, mask, :]
    frequency = torch.bincount(selected.view(-1), minlength=num_experts)
    routing = torch.softmax(logits, dim=1, dtype=torch.float)
    routing = routing / torch.gather(routing, 1, selected).sum(-1, keepdim=True)
    ean_sum = torch.zeros(num_experts, dtype=torch.float64, device=x.device)
    weighted = torch.zeros_like(ean_sum)
    gate_sum = torch.zeros_like(ean_sum)
    max_act = torch.zeros(num_experts)
    for i in range(num_experts):
        active = (selected == i).any(dim=-1)
        if not active.any():  # host sync per expert
            continue
        norms = torch.linalg.norm(activations[i, active, :], dim=-1)
        ean_sum[i] = norms.sum()
        weighted[i] = (norms * routing[active, i]).sum()
        gate_sum[i] = routing[active, i].sum()
        current = activations[i, active, :].max().to("cpu")  # host sync per expert
        if current > max_act[i]:
            max_act[i] = current
    return out, (num_tokens, frequency.cpu(), ean_sum.cpu(), weighted.cpu(), gate_sum.cpu(), max_act)


def unavailable(variant: str, experts, inputs_: tuple) -> str | None:
    """Why a transformers variant cannot run here (None: it can)."""
    x, index, weights = inputs_[:3]
    if variant == "batched_mm" and CUDA:
        gather = x.shape[0] * SHAPE["k"] * 3 * SHAPE["H"] * SHAPE["I"] * x.element_size()
        free = torch.cuda.mem_get_info()[0]
        if gather > free / 2:
            return f"batched_mm would gather {gather / 1e9:.0f} GB of weights; {free / 1e9:.0f} GB free"
    if variant in ("grouped_mm", "batched_mm"):
        try:
            ALL_EXPERTS_FUNCTIONS[variant](experts, x[:4], index[:4], weights[:4])
        except Exception as error:  # not available on this device / torch version
            return f"{variant} does not run here: {type(error).__name__}: {str(error)[:100]}"
    return None


def liger_unavailable(experts, x, index, weights) -> str | None:
    """Why Liger-Kernel's fused MoE cannot run here (None: it can)."""
    try:
        from liger_kernel.ops.fused_moe import LigerFusedMoEFunction
    except ImportError as error:
        return f"Liger-Kernel's fused MoE not importable: {type(error).__name__}: {str(error)[:100]}"
    try:
        LigerFusedMoEFunction.apply(x[:4], experts.gate_up_proj, experts.down_proj, index[:4], weights[:4])
    except Exception as error:  # its Triton kernels need a GPU driver (the CPU interpreter finds none)
        return f"Liger-Kernel's fused MoE (Triton) does not run here: {type(error).__name__}: {str(error)[:100]}"
    return None


def liger_forward(experts, x, index, weights):
    """Liger-Kernel's fused MoE forward (``LigerFusedMoEFunction``: same (E, 2I, H) / (E, H, I) layout)."""
    from liger_kernel.ops.fused_moe import LigerFusedMoEFunction

    return LigerFusedMoEFunction.apply(x, experts.gate_up_proj, experts.down_proj, index, weights)


def upstream_observer_call(experts, num_tokens: int, hf_name: str):
    """Upstream's observer.py hooked on the 4.55-shaped stand-in block (``bench/upstream_observer.py``).

    Before timing, the stand-in's output is asserted equal to the fused experts' output (same weights, the
    stand-in's own routing) within fp32 / bf16 tolerance, and its router logits to the inputs' logits."""
    import upstream_observer

    reason = upstream_observer.unavailable()
    if reason is not None:
        pytest.skip(reason)
    x, index, weights, gates, mask, logits = inputs(num_tokens)
    model, observer = upstream_observer.observed_layer(experts, router_weight(num_tokens), SHAPE["k"])
    block = model.layers[0]
    tolerance = 1e-4 if DTYPE == torch.float32 else 3e-2
    with torch.no_grad():
        for hook in observer.hooks:  # the check runs the block alone, then the hooks go back on
            hook.remove()
        out, block_logits = block(x[None])
        block_weights, block_index = block.route(block_logits, x.dtype)
        expected = hf_forward(hf_name, experts, x, block_index, block_weights)
        error = ((out[0].float() - expected.float()).norm() / expected.float().norm()).item()
        assert error < tolerance, f"stand-in block differs from the fused experts: relative error {error:.2e}"
        logit_error = ((block_logits.float() - logits.float()).norm() / logits.float().norm()).item()
        assert logit_error < tolerance, f"stand-in router differs from the inputs' router: {logit_error:.2e}"
    observer.hooks.clear()
    observer._hook_model()
    mask_2d = mask.view(1, -1)

    def call():
        with observer.set_attention_mask(mask_2d):
            return block(x[None])

    return call


def make_call(variant: str, num_tokens: int):
    experts = layer()
    x, index, weights, gates, mask, logits = inputs(num_tokens)
    hf_name = hf_fastest_name(experts, x, index, weights)
    reason = unavailable(variant, experts, (x, index, weights))
    if variant == "liger_fused":
        reason = liger_unavailable(experts, x, index, weights)
    if reason is not None:
        pytest.skip(reason)
    if variant == "upstream_observer":
        observed = upstream_observer_call(experts, num_tokens, hf_name)
    calls = {
        "hf_eager": lambda: hf_forward("eager", experts, x, index, weights),
        "grouped_mm": lambda: hf_forward("grouped_mm", experts, x, index, weights),
        "batched_mm": lambda: hf_forward("batched_mm", experts, x, index, weights),
        "upstream_hook": lambda: upstream_hook(experts, x, index, weights, mask, logits, hf_name),
        "hf_fastest": lambda: hf_forward(hf_name, experts, x, index, weights),
        "reference_stats": lambda: reference_experts_forward(experts, x, index, weights, gates, mask),
        "triton_stats": lambda: triton_experts_forward(experts, x, index, weights, gates, mask),
        "triton_plain": lambda: triton_experts_forward(experts, x, index, weights),
        "upstream_observer": lambda: observed(),
        "liger_fused": lambda: liger_forward(experts, x, index, weights),
    }
    call = calls[variant]

    @torch.no_grad()
    def run():
        result = call()
        if CUDA:
            torch.cuda.synchronize()
        return result

    info = {"variant": variant, "T": num_tokens, **SHAPE, "dtype": str(DTYPE).replace("torch.", ""),
            "device": torch.cuda.get_device_name() if CUDA else f"cpu ({os.cpu_count()} cores)", "hf_impl": hf_name}
    return run, info


@pytest.mark.parametrize("num_tokens", TOKENS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_moe_layer(benchmark, variant, num_tokens):
    run, info = make_call(variant, num_tokens)
    benchmark.extra_info.update(info)
    benchmark.group = f"moe_layer T={num_tokens}"
    run()  # warm-up: Triton compilation, cuBLAS heuristics
    benchmark.pedantic(run, rounds=ROUNDS.get(variant, DEFAULT_ROUNDS), iterations=1, warmup_rounds=1)
    benchmark.extra_info.update(throughput(SHAPE, num_tokens, torch.finfo(DTYPE).bits // 8, benchmark.stats.stats.median,
                                           info["device"]))


def main(argv: list[str]) -> int:
    """Fallback without pytest-benchmark: median wall time of each variant, written as JSON."""
    sys.path.insert(0, os.path.dirname(__file__))
    from conftest import environment_info

    path = argv[argv.index("--json") + 1] if "--json" in argv else None
    rows = []
    for num_tokens in TOKENS:
        for variant in VARIANTS:
            run, info = make_call(variant, num_tokens)
            run()
            times = []
            for _ in range(ROUNDS.get(variant, DEFAULT_ROUNDS)):
                start = time.perf_counter()
                run()
                times.append(time.perf_counter() - start)
            times.sort()
            rows.append({**info, "median_s": times[len(times) // 2], "min_s": times[0], "rounds": len(times)})
            print(f"T={num_tokens:6d} {variant:16s} median {rows[-1]['median_s'] * 1e3:9.3f} ms", flush=True)
    result = {"machine_info": {"reap_fast": environment_info()}, "results": rows}
    if path:
        with open(path, "w") as handle:
            json.dump(result, handle, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
