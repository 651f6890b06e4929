"""The Triton engine (reap_kernels) against the reference engine and the float64 oracle.

Runs on the CPU under TRITON_INTERPRET=1 (set by conftest.py when there is no GPU) with tiny shapes,
and unchanged on a GPU. Experts modules are real transformers classes (Qwen3MoeExperts, GptOssExperts),
so the layout flags (is_transposed, is_concatenated, has_bias) are the ones the models use.

Tolerances (each states the error it covers; outputs have |out| up to ~30, rows |y| ~ 1-10):
* fp32, triton vs reference: both round only at fp32 precision but sum the GEMM products in another
  order; measured max |diff| ~1e-5 at |out| ~ 22 (a few fp32 ulps) -> rtol 1e-5 + atol 1e-5 on outputs,
  rtol 1e-5 on the statistics (fp32 sums of <= 100 terms; measured <= 5e-7).
* fp32 vs the float64 oracle: the same fp32 rounding against exact arithmetic (measured <= 2e-7
  relative) -> rtol 1e-4, atol 1e-5.
* fp16, triton vs the reference run on the same fp16 inputs: the kernels round at the same points as
  the PyTorch path (GEMM output, silu, product, weighted sum), but a different fp32 accumulation order
  can move an intermediate to the neighbouring fp16 value; measured max |diff| 4e-3 at |out| ~ 27,
  i.e. below one fp16 ulp there (2^-6) -> rtol 2e-3 (two fp16 ulps) + atol 2e-3 on outputs; the norm
  sums and maxima (measured <= 7e-7 relative) -> rtol 1e-4 (allows a few rows one ulp apart).
* fp16 vs the float64 oracle (no intermediate rounding at all): the fp16 rounding of x@W, silu, h and y
  (each <= 2^-11 relative) compounds per element; measured <= 7.4e-4 relative on the maxima (a single
  element) and <= 1.6e-4 on the norm sums -> rtol 5e-3, atol 5e-3.
bf16 is not tested here: the interpreter's bf16 arithmetic is wrong (see tests/test_kernels_gpu.py).
"""

from __future__ import annotations


import pytest
import torch
from oracle import assert_metrics_close, oracle_layer_stats
from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

import reap_kernels
from reap_lab.families_tiny import tiny_family_config
from reap_fast.metrics import LayerAccumulator
from reap_fast.observe.engines import EngineUnavailableError, register_engine
from reap_fast.observe.reference import reference_experts_forward
from reap_fast.observe.session import Observer
from reap_fast.observe.triton_engine import triton_experts_forward
from reap_lab.tiny import build_model, tiny_qwen3_moe_config

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # on a GPU the same tests run compiled kernels
STAT_KEYS = ("expert_frequency", "ean_sum", "weighted_ean_sum", "weighted_expert_frequency_sum", "max_activations")
TOL = {  # (out rtol, out atol, stats rtol, oracle rtol, oracle atol) -- justified in the module docstring
    torch.float32: (1e-5, 1e-5, 1e-5, 1e-4, 1e-5),
    torch.float16: (2e-3, 2e-3, 1e-4, 5e-3, 5e-3),
}


def qwen3_experts(num_experts: int, top_k: int, hidden: int, inter: int, dtype: torch.dtype, seed: int = 0):
    config = tiny_qwen3_moe_config(
        hidden_size=hidden, moe_intermediate_size=inter, num_experts=num_experts, num_experts_per_tok=top_k
    )
    experts = Qwen3MoeExperts(config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        # scales keep |h| and |y| around 1, so fp16 tolerances are meaningful
        experts.gate_up_proj.copy_(torch.randn(experts.gate_up_proj.shape, generator=generator) * hidden**-0.5 * 2)
        experts.down_proj.copy_(torch.randn(experts.down_proj.shape, generator=generator) * inter**-0.5 * 2)
    return experts.to(DEVICE, dtype).eval()


def gpt_oss_experts(num_experts: int, dtype: torch.dtype, seed: int = 0):
    config = tiny_family_config("gpt_oss", num_experts=num_experts, top_k=2)
    experts = GptOssExperts(config)
    generator = torch.Generator().manual_seed(seed)
    hidden, inter = config.hidden_size, config.intermediate_size
    with torch.no_grad():
        # large enough that some gate/up values pass the +-limit clamp (limit 7)
        experts.gate_up_proj.copy_(torch.randn(experts.gate_up_proj.shape, generator=generator) * hidden**-0.5 * 4)
        experts.gate_up_proj_bias.copy_(torch.randn(experts.gate_up_proj_bias.shape, generator=generator))
        experts.down_proj.copy_(torch.randn(experts.down_proj.shape, generator=generator) * inter**-0.5)
        experts.down_proj_bias.copy_(torch.randn(experts.down_proj_bias.shape, generator=generator) * 0.1)
    return experts.to(DEVICE, dtype).eval()


def routing(num_tokens: int, num_experts: int, top_k: int, kind: str, seed: int = 1):
    """(top_k_index, top_k_weights, gates, hidden generator) with distinct experts per token."""
    generator = torch.Generator().manual_seed(seed)
    pool = num_experts
    if kind == "unused":  # only the first half of the experts receive tokens
        pool = max(top_k, num_experts // 2)
    scores = torch.rand(num_tokens, pool, generator=generator)
    if kind == "one_expert":  # every token routes to expert `num_experts - 1` (in a random slot)
        scores[:, pool - 1] = 2.0
    index = scores.topk(top_k, dim=-1).indices
    if kind == "one_expert":
        index = index[:, torch.randperm(top_k, generator=generator)]
    logits = torch.randn(num_tokens, top_k, generator=generator)
    weights = torch.softmax(logits, dim=-1)
    gates = torch.softmax(logits + 0.1 * torch.randn(num_tokens, top_k, generator=generator), dim=-1)
    return index.to(DEVICE), weights.to(DEVICE), gates.float().to(DEVICE), generator


def run_case(experts, num_tokens, top_k, kind, masked, dtype, seed=1):
    num_experts, hidden = experts.down_proj.shape[0], experts.hidden_dim if hasattr(experts, "hidden_dim") else experts.hidden_size
    index, weights, gates, generator = routing(num_tokens, num_experts, top_k, kind, seed)
    x = torch.randn(num_tokens, hidden, generator=generator).to(DEVICE, dtype)
    mask = None
    if masked:
        mask = torch.rand(num_tokens, generator=generator) > 0.3
        mask[0] = False  # at least one padding token
    weights = weights.to(DEVICE, dtype)
    index_cpu, gates_cpu, mask_cpu = index.cpu(), gates.cpu(), mask
    mask = None if mask is None else mask.to(DEVICE)
    with torch.no_grad():
        out, stats = triton_experts_forward(experts, x, index, weights, gates, mask)
        ref_out, ref_stats = reference_experts_forward(experts, x, index, weights, gates, mask)
    out_rtol, out_atol, stats_rtol, oracle_rtol, oracle_atol = TOL[dtype]
    assert out.dtype == dtype and out.shape == (num_tokens, hidden)
    torch.testing.assert_close(out, ref_out, rtol=out_rtol, atol=out_atol)
    assert stats.expert_frequency.dtype == torch.int64 and stats.ean_sum.dtype == torch.float64
    assert int(stats.total_tokens) == int(ref_stats.total_tokens)
    assert torch.equal(stats.expert_frequency.long(), ref_stats.expert_frequency.long())
    for key in STAT_KEYS[1:]:
        torch.testing.assert_close(getattr(stats, key).double(), getattr(ref_stats, key).double(),
                                   rtol=stats_rtol, atol=stats_rtol, msg=key)
    unused = ref_stats.expert_frequency == 0
    assert torch.all(stats.max_activations[unused] == float("-inf"))
    accumulator = LayerAccumulator(num_experts, DEVICE)
    accumulator.add(stats)
    with torch.no_grad():
        oracle = oracle_layer_stats(experts, x, index_cpu, gates_cpu, mask_cpu)
    assert_metrics_close(accumulator.to_upstream(), oracle, rtol=oracle_rtol, atol=oracle_atol, context=f"{dtype} {kind}")
    return stats


# (E, k, H, I, T, routing kind, token mask): each shape names the edge case it covers
CASES = [
    pytest.param(8, 2, 64, 32, 37, "random", True, id="T37-not-multiple-of-BLOCK_M-with-padding"),
    pytest.param(6, 1, 33, 23, 21, "random", False, id="k1-odd-H-odd-I"),
    pytest.param(4, 4, 48, 40, 19, "random", True, id="k-equals-E"),
    pytest.param(8, 2, 32, 16, 25, "unused", True, id="experts-without-tokens"),
    pytest.param(5, 3, 24, 20, 17, "one_expert", False, id="all-tokens-on-one-expert"),
    pytest.param(8, 2, 64, 32, 3, "random", False, id="T-smaller-than-BLOCK_M"),
    pytest.param(3, 2, 40, 72, 40, "random", True, id="I-larger-than-BLOCK_N-H-multi-chunk"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("num_experts,top_k,hidden,inter,num_tokens,kind,masked", CASES)
def test_qwen3_layer_matches_reference_and_oracle(num_experts, top_k, hidden, inter, num_tokens, kind, masked, dtype):
    experts = qwen3_experts(num_experts, top_k, hidden, inter, dtype)
    stats = run_case(experts, num_tokens, top_k, kind, masked, dtype)
    if kind == "unused":
        assert int((stats.expert_frequency == 0).sum()) >= num_experts // 2
    if kind == "one_expert":
        assert int(stats.expert_frequency[num_experts - 1]) == num_tokens


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_gpt_oss_transposed_biased_interleaved_swiglu(dtype):
    experts = gpt_oss_experts(8, dtype)
    run_case(experts, 29, 2, "random", True, dtype)


def test_stats_off_same_output_no_stats():
    experts = qwen3_experts(8, 2, 64, 32, torch.float32)
    index, weights, gates, generator = routing(37, 8, 2, "random")
    x = torch.randn(37, 64, generator=generator).to(DEVICE)
    with torch.no_grad():
        plain, none = triton_experts_forward(experts, x, index, weights)
        observed, stats = triton_experts_forward(experts, x, index, weights, gates, None)
    assert none is None and stats is not None
    assert torch.equal(plain, observed)
    assert int(stats.total_tokens) == 37 and int(stats.expert_frequency.sum()) == 37 * 2


def test_all_tokens_masked_gives_empty_statistics():
    experts = qwen3_experts(4, 2, 32, 16, torch.float32)
    index, weights, gates, generator = routing(9, 4, 2, "random")
    x = torch.randn(9, 32, generator=generator).to(DEVICE)
    out, stats = triton_experts_forward(experts, x, index, weights, gates, torch.zeros(9, dtype=torch.bool, device=DEVICE))
    ref_out, _ = reference_experts_forward(experts, x, index, weights)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)  # the output ignores the mask
    assert int(stats.total_tokens) == 0 and int(stats.expert_frequency.sum()) == 0
    assert float(stats.ean_sum.abs().sum()) == 0.0 and torch.all(stats.max_activations == float("-inf"))


def test_zero_tokens():
    experts = qwen3_experts(4, 2, 32, 16, torch.float32)
    with torch.device(DEVICE):
        x = torch.zeros(0, 32)
        out, stats = triton_experts_forward(experts, x, torch.zeros(0, 2, dtype=torch.long), torch.zeros(0, 2),
                                            torch.zeros(0, 2), torch.zeros(0, dtype=torch.bool))
    assert out.shape == (0, 32) and int(stats.expert_frequency.sum()) == 0 and int(stats.total_tokens) == 0


def test_align_docstring_example():
    index = torch.tensor([[0, 2], [2, 1], [0, 2], [2, 0]])
    alignment = reap_kernels.align_by_expert(index, num_experts=3, block_m=4)
    assert alignment.max_blocks == 5
    assert alignment.sorted_pair_ids.tolist() == [0, 4, 7, 8, 3, 8, 8, 8, 1, 2, 5, 6] + [8] * 8
    assert alignment.block_expert.tolist() == [0, 1, 2, 3, 3]
    assert alignment.counts.tolist() == [3, 1, 4]
    assert alignment.expert_start.tolist() == [0, 4, 8]


def test_align_random_is_a_padded_permutation():
    generator = torch.Generator().manual_seed(3)
    index = torch.randint(0, 7, (53, 3), generator=generator)  # duplicates within a token are allowed here
    alignment = reap_kernels.align_by_expert(index, num_experts=7, block_m=16)
    ids = alignment.sorted_pair_ids.view(alignment.max_blocks, 16)
    real = ids[ids < 53]
    assert sorted(real.tolist()) == list(range(53))
    flat = index.reshape(-1)
    for block, expert in enumerate(alignment.block_expert.tolist()):
        rows = ids[block][ids[block] < 53]
        if expert == 7:
            assert rows.numel() == 0
        else:
            assert torch.all(flat[rows.long()] == expert)
    for expert in range(7):  # each expert's pairs: contiguous from expert_start, in pair-id order
        start, count = int(alignment.expert_start[expert]), int(alignment.counts[expert])
        rows = alignment.sorted_pair_ids[start:start + count].long()
        assert torch.all(flat[rows] == expert) and torch.all(rows[1:] > rows[:-1])
        assert count == int((flat == expert).sum())


def expected_alignment(index: torch.Tensor, num_experts: int, block_m: int):
    """The padded expert-sorted layout built independently, pair by pair, in Python."""
    flat = index.reshape(-1).tolist()
    num_pairs = len(flat)
    max_blocks = -(-num_pairs // block_m) + min(num_experts, num_pairs)
    rows, block_expert, starts = [], [], []
    for expert in range(num_experts):
        pairs = [p for p, e in enumerate(flat) if e == expert]
        starts.append(len(rows))
        padded = -(-len(pairs) // block_m) * block_m
        rows += pairs + [num_pairs] * (padded - len(pairs))
        block_expert += [expert] * (padded // block_m)
    rows += [num_pairs] * (max_blocks * block_m - len(rows))
    block_expert += [num_experts] * (max_blocks - len(block_expert))
    counts = [flat.count(e) for e in range(num_experts)]
    return rows, block_expert, counts, starts


@pytest.mark.parametrize("num_tokens,top_k,num_experts,block_m,kind", [
    (3, 2, 5, 16, "T < block_m"),
    (20, 4, 4, 16, "k = E"),
    (37, 2, 9, 16, "empty experts"),
    (700, 3, 6, 64, "several chunks"),
    (1, 1, 1, 16, "one pair"),
    (300, 8, 128, 32, "many experts, strided int32 ids"),
])
def test_alignment_edge_cases_match_a_pairwise_construction(num_tokens, top_k, num_experts, block_m, kind):
    generator = torch.Generator().manual_seed(num_tokens)
    if kind == "empty experts":
        index = torch.randint(0, 4, (num_tokens, top_k), generator=generator)  # experts 4..8 get nothing
    else:
        index = torch.stack([torch.randperm(num_experts, generator=generator)[:top_k] for _ in range(num_tokens)])
    if kind.endswith("strided int32 ids"):
        index = torch.cat([index, index], dim=1).to(torch.int32)[:, ::2]  # a non-contiguous view
        assert not index.is_contiguous()
    alignment = reap_kernels.align_by_expert(index.to(DEVICE), num_experts, block_m)
    rows, block_expert, counts, starts = expected_alignment(index, num_experts, block_m)
    assert alignment.sorted_pair_ids.cpu().tolist() == rows
    assert alignment.block_expert.cpu().tolist() == block_expert
    assert alignment.counts.cpu().tolist() == counts and alignment.expert_start.cpu().tolist() == starts


def test_statistics_are_named_and_typed_as_the_observation_file_keys():
    """One vocabulary: the kernels' statistics and running totals, BatchStats and the accumulator's totals carry
    the file's keys and dtypes, so no engine translates names."""
    from dataclasses import fields

    from reap_fast.metrics import METRIC_DTYPES, BatchStats
    from reap_kernels.registered import ACCUMULATOR_NAMES, STATS_NAMES

    assert set(STATS_NAMES) == {field.name for field in fields(BatchStats)}
    totals = LayerAccumulator(4).reap_tensors()
    assert tuple(sorted(totals)) == tuple(sorted(ACCUMULATOR_NAMES))
    assert {name: tensor.dtype for name, tensor in totals.items()} == {name: METRIC_DTYPES[name] for name in totals}
    for name, dtype in reap_kernels.expert_stats.STATISTICS_DTYPES.items():
        assert METRIC_DTYPES[name] == dtype, name


@pytest.mark.parametrize("masked", [False, True])
def test_expert_statistics_reduce_pairs_exactly(masked):
    """The per-expert reduction against float64 index_add over the same per-pair values.

    Skewed routing puts > 2 * BLOCK pairs on expert 0 (several loop iterations) and none on expert 5.
    Sums of fp32 values in fp64 are exact to fp64 rounding; maxima and counts are exact. Then the same
    call in accumulate mode adds onto given running totals (and the pairwise co-occurrence counts).
    """
    from reap_kernels.expert_stats import expert_statistics

    generator = torch.Generator().manual_seed(11)
    num_tokens, top_k, num_experts = 300, 3, 6
    index = torch.randint(1, 5, (num_tokens, top_k), generator=generator)
    index[:, 0] = 0
    index[:200, 1] = 0  # expert 0 gets 500 pairs
    flat = index.reshape(-1)
    pair_norm = torch.rand(num_tokens * top_k, generator=generator) * 10
    pair_max = torch.randn(num_tokens * top_k, generator=generator)
    gates = torch.rand(num_tokens, top_k, generator=generator)
    mask = torch.rand(num_tokens, generator=generator) > 0.25 if masked else torch.ones(num_tokens, dtype=torch.bool)
    alignment = reap_kernels.align_by_expert(index.to(DEVICE), num_experts, block_m=16)
    pairs = torch.cat([pair_norm, pair_max]).to(DEVICE)  # combine's buffer: norms, then maxima
    args = (alignment, pairs, gates.to(DEVICE), mask.to(DEVICE) if masked else None, top_k)
    with torch.device(DEVICE):
        stats = expert_statistics(*args, block=128)
    counted = mask.repeat_interleave(top_k)
    expected_count = torch.zeros(num_experts, dtype=torch.int64).index_add_(0, flat[counted], torch.ones(int(counted.sum()), dtype=torch.int64))
    assert expected_count[0] > 2 * 128 and expected_count[5] == 0
    assert torch.equal(stats["expert_frequency"].cpu(), expected_count)
    assert stats["total_tokens"].dtype == torch.int64 and int(stats["total_tokens"]) == int(mask.sum())
    norm64, gate64 = pair_norm.double()[counted], gates.reshape(-1).double()[counted]
    expected = {}
    for key, values in (("ean_sum", norm64), ("weighted_ean_sum", gate64 * norm64), ("weighted_expert_frequency_sum", gate64)):
        expected[key] = torch.zeros(num_experts, dtype=torch.float64).index_add_(0, flat[counted], values)
        assert stats[key].dtype == torch.float64
        torch.testing.assert_close(stats[key].cpu(), expected[key], rtol=1e-13, atol=0, msg=key)
    expected_max = torch.full((num_experts,), float("-inf")).scatter_reduce_(0, flat[counted], pair_max[counted], "amax")
    assert torch.equal(stats["max_activations"].cpu(), expected_max)

    # accumulate mode: hand-made running totals gain exactly this call's statistics
    running = {
        "total_tokens": torch.tensor(7), "expert_frequency": torch.arange(num_experts), "pairwise_expert_frequency": torch.ones(num_experts, num_experts, dtype=torch.int64),
        "ean_sum": torch.full((num_experts,), 0.5, dtype=torch.float64), "weighted_ean_sum": torch.zeros(num_experts, dtype=torch.float64),
        "weighted_expert_frequency_sum": torch.ones(num_experts, dtype=torch.float64), "max_activations": torch.full((num_experts,), 1.0),
    }
    before = {key: value.clone() for key, value in running.items()}
    running = {key: value.to(DEVICE) for key, value in running.items()}
    assert expert_statistics(*args, accumulators=running, block=128) is running
    assert int(running["total_tokens"]) == 7 + int(mask.sum())
    assert torch.equal(running["expert_frequency"].cpu(), before["expert_frequency"] + expected_count)
    assert torch.equal(running["pairwise_expert_frequency"].cpu(), 1 + expected_count[:, None] + expected_count[None, :])
    for key in ("ean_sum", "weighted_ean_sum", "weighted_expert_frequency_sum"):
        torch.testing.assert_close(running[key].cpu(), before[key] + expected[key], rtol=1e-13, atol=0, msg=key)
    assert torch.equal(running["max_activations"].cpu(), torch.maximum(before["max_activations"], expected_max))


def test_bad_inputs_raise_clear_errors():
    experts = qwen3_experts(4, 2, 32, 16, torch.float32)
    index, weights, gates, generator = routing(5, 4, 2, "random")
    x = torch.randn(5, 32, generator=generator).to(DEVICE)
    w_gu, w_d = experts.gate_up_proj.detach(), experts.down_proj.detach()
    with pytest.raises(ValueError, match="dtype"):
        reap_kernels.fused_moe(x.half(), w_gu, w_d, index, weights)
    with pytest.raises(ValueError, match="top_k_weights shape"):
        reap_kernels.fused_moe(x, w_gu, w_d, index, weights[:, :1])
    with pytest.raises(ValueError, match="hidden size"):
        reap_kernels.fused_moe(x[:, :16], w_gu, w_d, index, weights)
    with pytest.raises(ValueError, match="w_down shape"):
        reap_kernels.fused_moe(x, w_gu, w_d[:, :, :8], index, weights)
    with pytest.raises(ValueError, match="token_mask has"):
        reap_kernels.fused_moe(x, w_gu, w_d, index, weights, gates=gates, token_mask=torch.ones(4, dtype=torch.bool, device=DEVICE))
    with pytest.raises(ValueError, match="integer expert ids"):
        reap_kernels.fused_moe(x, w_gu, w_d, index.float(), weights)
    with pytest.raises(ValueError, match="not supported"):
        reap_kernels.fused_moe(x.double(), w_gu.double(), w_d.double(), index, weights)
    with pytest.raises(ValueError, match="outside"):  # expert id out of range: loud, never silent
        reap_kernels.fused_moe(x.cpu(), w_gu.cpu(), w_d.cpu(), index.cpu() + 4, weights.cpu())  # (CUDA: device assert)


def _small_layer(num_tokens=16, seed=4):
    experts = qwen3_experts(4, 2, 32, 16, torch.float32)
    index, weights, gates, generator = routing(num_tokens, 4, 2, "random", seed)
    x = torch.randn(num_tokens, 32, generator=generator).to(DEVICE)
    return experts, x, index, weights, gates


def _assert_same_stats(ours, theirs, context):
    assert int(ours.total_tokens) == int(theirs.total_tokens), context
    for key in STAT_KEYS:
        torch.testing.assert_close(getattr(ours, key).double(), getattr(theirs, key).double(), rtol=1e-5, atol=1e-6,
                                   equal_nan=True, msg=f"{context}: {key}")


def test_strided_token_mask_counts_its_own_tokens():
    """A non-contiguous 1-D mask (base[::2]) and a transposed 2-D one are read through their strides.

    Before the fix the kernel read base[:16] with unit stride: 8 counted tokens instead of 16 here.
    """
    experts, x, index, weights, gates = _small_layer()
    base = torch.zeros(32, dtype=torch.bool, device=DEVICE)
    base[0::2] = torch.arange(16, device=DEVICE) % 4 != 1  # 12 of 16 counted; the odd entries are all False
    strided = base[::2]
    assert not strided.is_contiguous() and int(strided.sum()) == 12
    with torch.no_grad():
        ref_out, ref_stats = reference_experts_forward(experts, x, index, weights, gates, strided.contiguous())
        for mask in (strided, strided.contiguous()):
            out, stats = triton_experts_forward(experts, x, index, weights, gates, mask)
            _assert_same_stats(stats, ref_stats, f"mask contiguous={mask.is_contiguous()}")
        _, direct = reap_kernels.fused_moe(x, experts.gate_up_proj.detach(), experts.down_proj.detach(), index, weights,
                                           gates=gates, token_mask=strided)
        assert int(direct["total_tokens"]) == 12 and int(direct["expert_frequency"].sum()) == 24
        grid = strided.contiguous().view(4, 4)  # a (batch, seq) mask given as the transpose of a (seq, batch) one
        transposed = grid.t().contiguous().t()
        assert not transposed.is_contiguous()
        _, stats = triton_experts_forward(experts, x, index, weights, gates, transposed)
        _assert_same_stats(stats, ref_stats, "2-D transposed mask")


@pytest.mark.filterwarnings("ignore:All-NaN slice:RuntimeWarning")  # numpy inside the interpreter's tl.max
def test_nan_activation_gives_nan_max_as_torch_does():
    """A NaN in a counted row makes its experts' max NaN (torch.amax / maximum propagate NaN; tl.max drops it);
    a masked token's NaN counts nowhere; a NaN running maximum stays NaN when more batches are added."""
    experts, x, index, weights, gates = _small_layer()
    x[3, 0] = float("nan")
    nan_experts = set(index[3].tolist())
    mask = torch.ones(16, dtype=torch.bool, device=DEVICE)
    with torch.no_grad():
        for counted in (True, False):
            mask[3] = counted
            _, ref_stats = reference_experts_forward(experts, x, index, weights, gates, mask)
            _, stats = triton_experts_forward(experts, x, index, weights, gates, mask)
            is_nan = set(torch.nonzero(stats.max_activations.isnan()).flatten().tolist())
            assert is_nan == (nan_experts if counted else set()), counted
            assert torch.equal(stats.max_activations.isnan(), ref_stats.max_activations.isnan())
            finite = ~ref_stats.max_activations.isnan()
            torch.testing.assert_close(stats.max_activations[finite], ref_stats.max_activations[finite], rtol=1e-5, atol=1e-6)
        accumulator = LayerAccumulator(4, DEVICE)
        mask[3] = True
        triton_experts_forward(experts, x, index, weights, gates, mask, accumulator)  # NaN into the running max
        x[3, 0] = 1.0
        triton_experts_forward(experts, x, index, weights, gates, mask, accumulator)  # a finite batch on top
    assert set(torch.nonzero(accumulator.max_activations.isnan()).flatten().tolist()) == nan_experts


@pytest.mark.parametrize("case", ["fp16-activations-fp32-weights", "fp64-routing-weights", "fp64"])
def test_unsupported_dtypes_make_the_engine_unavailable(case):
    """Dtypes the kernels do not take raise EngineUnavailableError with the reason (before any launch), so a
    caller falls back to the reference engine; fused_moe itself raises UnsupportedInputError (a ValueError)."""
    experts, x, index, weights, gates = _small_layer()
    if case == "fp16-activations-fp32-weights":
        x, match = x.half(), "dtype torch.float32 differs from hidden_states dtype torch.float16"
    elif case == "fp64-routing-weights":
        weights, match = weights.double(), "top_k_weights dtype torch.float64 is not supported"
    else:
        experts, x, weights, match = experts.double(), x.double(), weights.double(), "dtype torch.float64 is not supported"
    with pytest.raises(EngineUnavailableError, match=match):
        triton_experts_forward(experts, x, index, weights, gates, None)
    with pytest.raises(reap_kernels.UnsupportedInputError, match=match):
        reap_kernels.fused_moe(x, experts.gate_up_proj.detach(), experts.down_proj.detach(), index, weights)


@pytest.mark.parametrize("logits_dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("renormalize", [True, False], ids=["renormalized", "softmax"])
def test_router_gate_from_logits_matches_the_pytorch_gate(renormalize, logits_dtype):
    """RouterGate: the combine kernel's g from (strided) router logits equals the adapters' PyTorch gate
    (softmax in fp32, gather, renormalise, clamp) to a few fp32 ulps: exp and the E-long sum round differently."""
    experts, x, index, weights, _ = _small_layer()
    logits = torch.randn(4, 16, generator=torch.Generator().manual_seed(8)).t().to(DEVICE, logits_dtype)  # strided
    index = torch.softmax(logits.float(), -1).topk(2, -1).indices
    gates = torch.softmax(logits, dim=-1, dtype=torch.float32).gather(1, index)
    if renormalize:
        gates = (gates / gates.sum(-1, keepdim=True)).clamp(min=torch.finfo(torch.float32).eps)
    w_gu, w_d = experts.gate_up_proj.detach(), experts.down_proj.detach()
    mask = torch.arange(16, device=DEVICE) % 4 != 2
    expected = reap_kernels.fused_moe(x, w_gu, w_d, index, weights, gates=gates, token_mask=mask)[1]
    ours = reap_kernels.fused_moe(x, w_gu, w_d, index, weights, gates=reap_kernels.RouterGate(logits, renormalize),
                                  token_mask=mask)[1]
    for key in ("expert_frequency", "total_tokens", "ean_sum", "max_activations"):  # no gate in these: the same bits
        assert torch.equal(ours[key], expected[key]), key
    for key in ("weighted_ean_sum", "weighted_expert_frequency_sum"):
        torch.testing.assert_close(ours[key], expected[key], rtol=4e-7, atol=0, msg=key)


def test_engine_unavailable(monkeypatch):
    experts = qwen3_experts(4, 2, 32, 16, torch.float32)
    index, weights, _, generator = routing(5, 4, 2, "random")
    x = torch.randn(5, 32, generator=generator).to(DEVICE)
    experts.act_fn = torch.nn.GELU()
    with pytest.raises(EngineUnavailableError, match="GELU"):
        triton_experts_forward(experts, x, index, weights)
    experts.act_fn = torch.nn.SiLU()
    experts.has_gate = False
    with pytest.raises(EngineUnavailableError, match="without a gate"):
        triton_experts_forward(experts, x, index, weights)
    experts.has_gate = True
    monkeypatch.setattr(reap_kernels, "INTERPRET", False)
    with pytest.raises(EngineUnavailableError, match="CUDA"):
        triton_experts_forward(experts, x.cpu(), index.cpu(), weights.cpu())


def test_whole_tiny_model_through_observer():
    """Observer(engine='triton') == Observer(engine='reference'); plain triton logits == stock logits."""
    model = build_model(tiny_qwen3_moe_config(), seed=0).to(DEVICE)
    generator = torch.Generator().manual_seed(5)
    input_ids = torch.randint(0, 256, (2, 11), generator=generator)
    attention_mask = torch.ones(2, 11, dtype=torch.long)
    attention_mask[1, 7:] = 0  # right padding in the second row
    input_ids[1, 7:] = 257
    input_ids, attention_mask = input_ids.to(DEVICE), attention_mask.to(DEVICE)
    metrics = {}
    for engine in ("reference", "triton"):
        with Observer(model, engine=engine) as observer:
            observer.forward(input_ids, attention_mask)
        metrics[engine] = observer.metrics()
    assert metrics["triton"].keys() == metrics["reference"].keys() and len(metrics["triton"]) == 2
    for layer, reference in metrics["reference"].items():
        ours = metrics["triton"][layer]
        assert int(ours["total_tokens"]) == 18
        # fp32 model: both engines compute the same routing; sums agree to fp32 rounding
        assert_metrics_close(ours, {k: v.double() if v.is_floating_point() else v for k, v in reference.items()},
                             rtol=1e-5, atol=1e-6, context=f"layer {layer}")

    with torch.no_grad():
        stock = model(input_ids=input_ids, attention_mask=attention_mask).logits
        previous = model.get_experts_implementation()
        model.set_experts_implementation(register_engine("triton"))
        try:
            ours = model(input_ids=input_ids, attention_mask=attention_mask).logits
        finally:
            model.set_experts_implementation(previous)
    torch.testing.assert_close(ours, stock, rtol=1e-4, atol=1e-4)


def test_config_table_lookup(monkeypatch, tmp_path):
    """default.json covers every shape; a device file entry wins when it matches; fp32 shrinks tiles."""
    from reap_kernels import config as kconfig

    monkeypatch.setattr(kconfig, "INTERPRET", False)
    small = kconfig.get_config(128, 2048, 768, 8, 16, torch.bfloat16, device_name="Some GPU")
    large = kconfig.get_config(128, 2048, 768, 8, 8192, torch.bfloat16, device_name="Some GPU")
    assert small.block_m == 16 and large.block_m == 64
    assert kconfig.get_config(128, 2048, 768, 8, 8192, torch.float32, device_name="Some GPU").gate_up.block_k == 32
    tuned = {"block_m": 128, "gate_up": {"block_n": 128, "block_k": 64}, "down": {"block_n": 256, "block_k": 64}}
    (tmp_path / "My_GPU.json").write_text(
        '{"entries": [{"match": {"E": 128, "H": 2048, "I": 768, "k": 8}, "T": 4096, "config": %s}]}'
        % __import__("json").dumps(tuned)
    )
    monkeypatch.setattr(kconfig, "CONFIG_DIR", tmp_path)
    (tmp_path / "default.json").write_text((kconfig.Path(kconfig.__file__).parent / "configs" / "default.json").read_text())
    assert kconfig.get_config(128, 2048, 768, 8, 2048, torch.bfloat16, device_name="My GPU").block_m == 128
    assert kconfig.get_config(64, 2048, 768, 8, 2048, torch.bfloat16, device_name="My GPU").block_m == 64
    with pytest.raises(ValueError, match="powers of two"):
        kconfig.MoEConfig.from_dict({**tuned, "block_m": 24})
