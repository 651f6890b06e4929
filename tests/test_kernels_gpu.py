"""The Triton engine on a GPU at the real Qwen3-30B-A3B layer shape, bf16 and fp16 (skipped without CUDA).

Shape: E=128 experts, k=8, H=2048, I=768, T=2048 and 8192 tokens; routing from a random router
(softmax, top-8, renormalised, as Qwen3 with norm_topk_prob). The triton engine is compared with the
reference engine run on the same 16-bit inputs, and its statistics also with the reference engine run
in fp32 on the same (16-bit-representable) weights.

Tolerances (16-bit, unit roundoff u = 2^-8 bf16 / 2^-11 fp16):
* layer output vs the 16-bit reference: both round at the same points, but cuBLAS and the Triton
  GEMMs accumulate 2048- and 768-long dot products in another order, so an intermediate may land on
  the neighbouring 16-bit value; elementwise rtol = atol = 4u * max|out| covers a few ulps, and the
  relative Frobenius error must stay below 2u (errors are not systematic).
* statistics vs the 16-bit reference: counts and token totals exact; ean / weighted_ean sums average
  thousands of rows whose norms differ by ~u/sqrt(H) -> rtol 2u; gate sums see only fp32 summation
  order -> rtol 1e-5; maxima are single elements, a few ulps apart -> rtol 4u.
* statistics vs the fp32 reference: the 16-bit path rounds x@W, the activation, h and y (4 roundings
  of u/2 each per element; norms average them) -> rtol 4u on the norm sums, 8u on the maxima.
"""

from __future__ import annotations

import pytest
import torch
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

from reap_fast.observe.reference import reference_experts_forward
from reap_fast.observe.triton_engine import triton_experts_forward
from reap_fast.tiny import tiny_qwen3_moe_config

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

E, K, H, I = 128, 8, 2048, 768
UNIT_ROUNDOFF = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


def real_layer(dtype: torch.dtype, seed: int = 0):
    config = tiny_qwen3_moe_config(hidden_size=H, moe_intermediate_size=I, num_experts=E, num_experts_per_tok=K)
    with torch.device("cuda"):
        experts = Qwen3MoeExperts(config)
    generator = torch.Generator(device="cuda").manual_seed(seed)
    with torch.no_grad():
        experts.gate_up_proj.normal_(0.0, 2 * H**-0.5, generator=generator)
        experts.down_proj.normal_(0.0, 2 * I**-0.5, generator=generator)
    return experts.to(dtype).eval()


def real_inputs(num_tokens: int, dtype: torch.dtype, seed: int = 1):
    generator = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(num_tokens, H, device="cuda", generator=generator)
    router = torch.randn(E, H, device="cuda", generator=generator) * H**-0.5
    probs = torch.softmax(x @ router.T, dim=-1)
    weights, index = probs.topk(K, dim=-1)
    weights = weights / weights.sum(-1, keepdim=True)
    mask = torch.rand(num_tokens, device="cuda", generator=generator) > 0.1  # ~10 % padding
    return x.to(dtype), index, weights.to(dtype), weights.float(), mask


def rel_close(ours: torch.Tensor, expected: torch.Tensor, rtol: float, what: str) -> None:
    ours, expected = ours.double(), expected.double()
    err = ((ours - expected).abs() / expected.abs().clamp(min=1e-6)).max().item()
    assert err <= rtol, f"{what}: max relative error {err:.3g} > {rtol:.3g}"


@pytest.mark.parametrize("num_tokens", [2048, 8192])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_real_shape_matches_reference(dtype, num_tokens):
    u = UNIT_ROUNDOFF[dtype]
    experts = real_layer(dtype)
    x, index, weights, gates, mask = real_inputs(num_tokens, dtype)
    with torch.no_grad():
        out, stats = triton_experts_forward(experts, x, index, weights, gates, mask)
        ref_out, ref_stats = reference_experts_forward(experts, x, index, weights, gates, mask)
        plain, no_stats = triton_experts_forward(experts, x, index, weights)
    torch.cuda.synchronize()
    assert no_stats is None and torch.equal(plain, out)

    scale = ref_out.float().abs().max().item()
    torch.testing.assert_close(out.float(), ref_out.float(), rtol=4 * u, atol=4 * u * scale)
    frobenius = ((out.float() - ref_out.float()).norm() / ref_out.float().norm()).item()
    assert frobenius < 2 * u, f"relative Frobenius error {frobenius:.3g}"

    assert int(stats.tokens) == int(mask.sum())
    assert torch.equal(stats.count.long(), ref_stats.count.long())
    used = ref_stats.count > 0
    rel_close(stats.ean_sum[used], ref_stats.ean_sum[used], 2 * u, "ean_sum")
    rel_close(stats.weighted_ean_sum[used], ref_stats.weighted_ean_sum[used], 2 * u, "weighted_ean_sum")
    rel_close(stats.gate_sum[used], ref_stats.gate_sum[used], 1e-5, "gate_sum")
    rel_close(stats.max_activation[used], ref_stats.max_activation[used], 4 * u, "max_activation")

    # against fp32 arithmetic on the same weights (only at the smaller T: the fp32 copy is 2.4 GB)
    if num_tokens == 2048:
        experts32 = real_layer(torch.float32)
        with torch.no_grad():
            experts32.gate_up_proj.copy_(experts.gate_up_proj.float())
            experts32.down_proj.copy_(experts.down_proj.float())
            _, stats32 = reference_experts_forward(experts32, x.float(), index, weights.float(), gates, mask)
        rel_close(stats.ean_sum[used], stats32.ean_sum[used], 4 * u, "ean_sum vs fp32")
        rel_close(stats.weighted_ean_sum[used], stats32.weighted_ean_sum[used], 4 * u, "weighted_ean_sum vs fp32")
        rel_close(stats.max_activation[used], stats32.max_activation[used], 8 * u, "max_activation vs fp32")


def test_gpt_oss_layout_bf16():
    """The transposed, biased, interleaved gpt-oss layout at a small shape in bf16."""
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

    from reap_fast.families_tiny import tiny_family_config

    config = tiny_family_config("gpt_oss", num_experts=32, top_k=4)
    config.hidden_size, config.intermediate_size = 512, 384
    with torch.device("cuda"):
        experts = GptOssExperts(config)
    with torch.no_grad():
        for param, std in ((experts.gate_up_proj, 4 * 512**-0.5), (experts.gate_up_proj_bias, 1.0),
                           (experts.down_proj, 384**-0.5), (experts.down_proj_bias, 0.1)):
            param.normal_(0.0, std)
    experts = experts.to(torch.bfloat16)
    u = UNIT_ROUNDOFF[torch.bfloat16]
    x = torch.randn(300, 512, device="cuda").bfloat16()
    index = torch.rand(300, 32, device="cuda").topk(4, dim=-1).indices
    weights = torch.softmax(torch.randn(300, 4, device="cuda"), -1)
    with torch.no_grad():
        out, stats = triton_experts_forward(experts, x, index, weights.bfloat16(), weights, None)
        ref_out, ref_stats = reference_experts_forward(experts, x, index, weights.bfloat16(), weights, None)
    scale = ref_out.float().abs().max().item()
    torch.testing.assert_close(out.float(), ref_out.float(), rtol=4 * u, atol=4 * u * scale)
    assert torch.equal(stats.count.long(), ref_stats.count.long())
    used = ref_stats.count > 0
    rel_close(stats.ean_sum[used], ref_stats.ean_sum[used], 2 * u, "ean_sum")


def test_statistics_are_bitwise_reproducible():
    """No atomics in the statistics: two calls on the same inputs give identical bits."""
    experts = real_layer(torch.bfloat16)
    x, index, weights, gates, mask = real_inputs(8192, torch.bfloat16)
    with torch.no_grad():
        first = triton_experts_forward(experts, x, index, weights, gates, mask)[1]
        second = triton_experts_forward(experts, x, index, weights, gates, mask)[1]
    for key in ("count", "ean_sum", "weighted_ean_sum", "gate_sum", "max_activation"):
        assert torch.equal(getattr(first, key), getattr(second, key)), key


def test_whole_model_bf16_observation_matches_reference():
    """A 4-layer Qwen3-MoE in bf16 on the GPU observed through the model's own forward by both engines.

    The first MoE layer sees identical inputs under both engines: counts equal, sums within 2u. Later
    layers see hidden states that differ by bf16 rounding (each engine's layer output feeds the next
    layer), so a near-tie router decision may flip: there the REAP scores must agree to 5 % and the
    kept half of the experts (by REAP score) must overlap in at least 7 of 8.
    """
    from reap_fast.observe import Observer
    from reap_fast.tiny import build_model

    config = tiny_qwen3_moe_config(hidden_size=256, moe_intermediate_size=128, num_hidden_layers=4,
                                   num_experts=16, num_experts_per_tok=4)
    model = build_model(config, seed=5).to("cuda", torch.bfloat16)
    generator = torch.Generator().manual_seed(6)
    input_ids = torch.randint(0, config.vocab_size, (4, 256), generator=generator).cuda()
    attention_mask = torch.ones_like(input_ids)
    attention_mask[-1, 200:] = 0  # right padding
    results = {}
    for engine in ("reference", "triton"):
        with Observer(model, engine=engine, renormalize=True) as observer:
            observer.forward(input_ids, attention_mask)
        results[engine] = observer.metrics()
    u = UNIT_ROUNDOFF[torch.bfloat16]
    ref, ours = results["reference"], results["triton"]
    assert sorted(ref) == sorted(ours) == [0, 1, 2, 3]
    first = min(ref)
    assert torch.equal(ours[first]["expert_frequency"], ref[first]["expert_frequency"])
    used = ref[first]["expert_frequency"] > 0
    for key in ("ean_sum", "weighted_ean_sum"):
        rel_close(ours[first][key][used], ref[first][key][used], 2 * u, f"layer {first} {key}")
    for layer in ref:
        assert int(ours[layer]["total_tokens"]) == int(attention_mask.sum())
        rel_close(ours[layer]["reap"], ref[layer]["reap"], 0.05, f"layer {layer} reap")
        kept_ref = set(ref[layer]["reap"].topk(8).indices.tolist())
        kept_ours = set(ours[layer]["reap"].topk(8).indices.tolist())
        assert len(kept_ref & kept_ours) >= 7, f"layer {layer}: kept {sorted(kept_ours)} vs {sorted(kept_ref)}"
