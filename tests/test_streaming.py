"""Layer streaming: same statistics as the in-memory forward (causal + padding mask included), fused-expert
conversion equal to transformers' loader, hidden-states tier choice, and memory that does not grow with depth."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from reap_fast.config import ObserveConfig
from reap_fast.data import CalibrationSet
from reap_lab.families_tiny import tiny_family_config
from reap_fast.models import UnsupportedModelError
from reap_fast.observe.session import Observer
from reap_fast.observe.streaming import (
    STREAMING_FAMILIES,
    CheckpointTensors,
    HiddenStore,
    MemoryBudget,
    StreamingReport,
    build_skeleton,
    choose_hidden_tier,
    decoder_layers,
    layer_tensors,
    observe_streaming,
    streaming_supported,
)
from reap_lab.tiny import build_model, byte_tokenizer, make_tiny_checkpoint, save_checkpoint
from transformers import AutoConfig, AutoModelForCausalLM

RTOL = 1e-5


def _calibration(num: int = 5, length: int = 24, seed: int = 0) -> CalibrationSet:
    """Random tokens with right padding in two rows and a separator excluded from the statistics."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 256, (num, length), generator=generator)
    attention = torch.ones(num, length, dtype=torch.long)
    attention[1, length - 9 :] = 0
    attention[num - 1, 5:] = 0
    stats = attention.bool().clone()
    stats[0, 7] = False  # a packing separator: attended, not counted
    ids[attention == 0] = 257
    return CalibrationSet(ids, attention, stats, ["c"] * num)


def _in_memory(path, calibration, batch_size):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with Observer(model, "reference") as observer:
        for batch in calibration.batches(batch_size):
            observer.forward(batch.input_ids, batch.attention_mask, batch.stats_mask)
    return observer.metrics()


def _streamed(path, calibration, batch_size, **kwargs):
    settings = ObserveConfig(batch_size=batch_size, engine="reference", device="cpu", dtype="float32", progress=False)
    accumulators = observe_streaming(path, calibration, settings, **kwargs)
    return {index: acc.to_upstream() for index, acc in sorted(accumulators.items())}


def _assert_close(expected, actual, rtol=RTOL):
    assert sorted(expected) == sorted(actual)
    for layer in expected:
        for key, value in expected[layer].items():
            if value.dtype == torch.int64:
                assert torch.equal(value, actual[layer][key]), (layer, key)
            else:
                torch.testing.assert_close(actual[layer][key], value, rtol=rtol, atol=0, msg=f"layer {layer} {key}")


@pytest.fixture(scope="module")
def deep_checkpoint(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("stream") / "tiny6", seed=3, num_hidden_layers=6)


@pytest.fixture(scope="module")
def deep_expected(deep_checkpoint):
    return _in_memory(deep_checkpoint, _calibration(), batch_size=2)


def test_streaming_equals_in_memory_forward_with_padding(deep_checkpoint, deep_expected):
    calibration = _calibration()
    expected = deep_expected
    report = StreamingReport()
    actual = _streamed(deep_checkpoint, calibration, batch_size=2, report=report)
    _assert_close(expected, actual)
    assert report.tier == "memory"
    assert all(int(values["total_tokens"]) == int(calibration.stats_mask.sum()) for values in actual.values())


def test_streaming_is_causal_a_non_causal_mask_changes_the_numbers(deep_checkpoint, deep_expected, monkeypatch):
    """Negative control: the equality above is sensitive to the mask (a peer ran layers without one)."""
    import transformers.models.qwen3_moe.modeling_qwen3_moe as qwen3_moe

    calibration = _calibration()
    expected = deep_expected

    def full_attention(config, inputs_embeds, attention_mask, *args, **kwargs):
        batch, length = inputs_embeds.shape[:2]
        return torch.ones(batch, 1, length, length, dtype=torch.bool)

    monkeypatch.setattr(qwen3_moe, "create_causal_mask", full_attention)
    wrong = _streamed(deep_checkpoint, calibration, batch_size=2)
    assert not torch.allclose(wrong[0]["ean_sum"], expected[0]["ean_sum"], rtol=RTOL, atol=0)


def test_streaming_sharded_checkpoint_and_disk_tier(deep_checkpoint, tmp_path):
    """An index json with several shards, and hidden states in a memory-mapped file (budget injected)."""
    model = AutoModelForCausalLM.from_pretrained(deep_checkpoint, dtype=torch.float32)
    sharded = tmp_path / "sharded"
    model.save_pretrained(sharded, max_shard_size="40KB")
    byte_tokenizer().save_pretrained(sharded)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 3
    calibration = _calibration(num=4, seed=1)
    expected = _streamed(deep_checkpoint, calibration, batch_size=3)
    scratch = tmp_path / "scratch"
    report = StreamingReport()
    actual = _streamed(sharded, calibration, batch_size=3, memory_budget=MemoryBudget(host_free=0),
                       scratch_dir=scratch, report=report)
    assert report.tier == "disk"
    _assert_close(expected, actual, rtol=0)
    assert not list(scratch.glob("*.bin"))  # the scratch file is removed


def test_fused_experts_match_from_pretrained(deep_checkpoint):
    """Per-expert -> fused stacking gives exactly the tensors transformers' own loader builds."""
    loaded = AutoModelForCausalLM.from_pretrained(deep_checkpoint, dtype=torch.float32)
    reference = loaded.state_dict()
    skeleton = build_skeleton(AutoConfig.from_pretrained(deep_checkpoint), torch.float32)
    _, layers, name = decoder_layers(skeleton)
    reader = CheckpointTensors(deep_checkpoint)
    for index, layer in enumerate(layers):
        tensors = layer_tensors(reader, f"{name}.{index}.", layer)
        assert {"mlp.experts.gate_up_proj", "mlp.experts.down_proj"} <= set(tensors)
        for key, tensor in tensors.items():
            assert torch.equal(tensor, reference[f"{name}.{index}.{key}"]), key


def test_every_family_streams():
    """With streaming chosen automatically, a family that cannot stream would make large models impossible."""
    from reap_fast.models import ADAPTERS

    assert set(STREAMING_FAMILIES) == {adapter.family for adapter in ADAPTERS}
    assert "mixtral" in STREAMING_FAMILIES


@pytest.mark.parametrize("family", [f for f in STREAMING_FAMILIES if f != "qwen3_moe"])
def test_streaming_equals_in_memory_other_families(family, tmp_path):
    """Dense first layers (DeepSeek-V3, GLM-4.5), hybrid linear attention with padding (Qwen3-Next, 3.5), Mixtral's
    own checkpoint names (block_sparse_moe, w1/w2/w3)."""
    model = build_model(tiny_family_config(family, layers=3), seed=0)
    path = save_checkpoint(model, byte_tokenizer(), tmp_path / family)
    calibration = _calibration(num=3, length=16)
    _assert_close(_in_memory(path, calibration, 2), _streamed(path, calibration, 2))


def test_unsupported_family_is_refused_clearly():
    from transformers import Llama4Config

    with pytest.raises(UnsupportedModelError, match="multimodal llama4 .* without --layerwise"):
        streaming_supported(Llama4Config(text_config=tiny_family_config("llama4").to_dict()))


def test_hidden_tier_choice():
    gib = 1024**3
    gpu = MemoryBudget(device_free=10 * gib, host_free=100 * gib)
    assert choose_hidden_tier(2 * gib, "cuda:0", gpu, gib) == "device"
    assert choose_hidden_tier(9.5 * gib, "cuda:0", gpu, gib) == "pinned"  # the layer reserve does not fit beside it
    assert choose_hidden_tier(90 * gib, "cuda:0", gpu, gib) == "disk"
    assert choose_hidden_tier(2 * gib, "cpu", MemoryBudget(host_free=8 * gib), gib) == "memory"
    assert choose_hidden_tier(8 * gib, "cpu", MemoryBudget(host_free=8 * gib), gib) == "disk"


def test_hidden_store_snapshot_round_trip(tmp_path):
    store = HiddenStore((5, 3, 4), torch.bfloat16, "disk", torch.device("cpu"), tmp_path)
    values = torch.randn(5, 3, 4).to(torch.bfloat16)
    store.write(0, 5, values)
    description = store.snapshot(tmp_path / "snap.bin", rows_per_chunk=2)
    other = HiddenStore((5, 3, 4), torch.bfloat16, "memory", torch.device("cpu"))
    other.restore(tmp_path / "snap.bin", description, rows_per_chunk=2)
    assert torch.equal(other.read(0, 5), values)
    store.close()
    assert not list(tmp_path.glob("reap-fast-hidden-*"))


# --- memory: one layer at a time ---------------------------------------------------------------------

_BIG = dict(hidden_size=256, moe_intermediate_size=320, num_experts=16, num_experts_per_tok=4, intermediate_size=256,
            num_attention_heads=4, num_key_value_heads=2, head_dim=64)


def _layer_weight_bytes() -> int:
    h, i, e = _BIG["hidden_size"], _BIG["moe_intermediate_size"], _BIG["num_experts"]
    return 4 * (3 * e * h * i)  # fp32 experts dominate the layer


@pytest.fixture(scope="module")
def big_checkpoints(tmp_path_factory):
    folder = tmp_path_factory.mktemp("big")
    return {layers: make_tiny_checkpoint(folder / f"l{layers}", seed=0, num_hidden_layers=layers, **_BIG)
            for layers in (3, 12)}


def test_resident_weight_bytes_do_not_grow_with_layer_count(tmp_path):
    """Accounting of the materialised weights: peak = one layer (or the embeddings), for 3 and 12 layers."""
    calibration = _calibration(num=2, length=16)
    peaks = {}
    for layers in (3, 12):
        path = make_tiny_checkpoint(tmp_path / f"l{layers}", seed=0, num_hidden_layers=layers)
        report = StreamingReport()
        _streamed(path, calibration, batch_size=2, report=report)
        assert report.live_weight_bytes == 0
        peaks[layers] = report.peak_weight_bytes
        assert report.peak_weight_bytes == max(max(report.layer_bytes), report.embed_bytes)
        assert sum(report.layer_bytes) > 2.5 * report.peak_weight_bytes
    assert peaks[3] == peaks[12]


_RSS_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    from reap_fast.data import CalibrationSet
    from reap_fast.config import ObserveConfig
    from reap_fast.observe.streaming import observe_streaming
    from transformers import AutoModelForCausalLM
    path, mode = sys.argv[1], sys.argv[2]
    ids = torch.randint(0, 256, (2, 16)); attention = torch.ones(2, 16, dtype=torch.long)
    calibration = CalibrationSet(ids, attention, attention.bool(), ["c", "c"])
    if mode == "stream":
        settings = ObserveConfig(batch_size=2, engine="reference", device="cpu", dtype="float32", progress=False)
        observe_streaming(path, calibration, settings)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    # VmHWM: this process image's peak RSS (ru_maxrss would inherit the forking parent's peak).
    status = dict(line.split(":", 1) for line in open("/proc/self/status"))
    print(int(status["VmHWM"].split()[0]) * 1024)
    """
)


def _peak_rss(path, mode) -> int:
    # A fixed mmap threshold makes glibc return every freed tensor to the OS (no dynamic threshold, no heap
    # fragmentation), so the peak RSS follows the live tensor bytes.
    env = dict(os.environ, OMP_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_="65536")
    done = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, str(path), mode], capture_output=True, text=True,
                          env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return int(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs Linux /proc")
def test_peak_rss_of_streaming_does_not_grow_with_layer_count(big_checkpoints):
    """Process peak RSS: streaming 12 layers costs less than one extra layer over 3 layers (15.7 MB each)."""
    layer = _layer_weight_bytes()
    stream = {layers: _peak_rss(path, "stream") for layers, path in big_checkpoints.items()}
    print(f"\npeak RSS: streaming 3 layers {stream[3] / 2**20:.0f} MiB, 12 layers {stream[12] / 2**20:.0f} MiB; "
          f"one layer {layer / 2**20:.1f} MiB, 9 more layers {9 * layer / 2**20:.0f} MiB")
    assert stream[12] - stream[3] < layer


def test_prefetch_keeps_two_layers_in_flight_in_two_reused_arenas(tmp_path):
    """The next layer is read while the current one computes: at most one read pending beside the layer in use,
    layers i and i + 2 share an arena (no new memory per layer), and each layer's tensors are the checkpoint's."""
    from reap_fast.models import get_adapter
    from reap_fast.observe.streaming.prefetch import LayerPrefetcher

    path = make_tiny_checkpoint(tmp_path / "tiny4", seed=0, num_hidden_layers=4)
    config = AutoConfig.from_pretrained(path)
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).state_dict()
    skeleton = build_skeleton(config, torch.float32)
    _, layers, name = decoder_layers(skeleton)
    prefetcher = LayerPrefetcher(CheckpointTensors(path), list(layers), name, get_adapter(config).streaming, "cpu")
    buffers = []
    try:
        prefetcher.request(0)
        for index in range(len(layers)):
            tensors = prefetcher.take(index)
            assert not prefetcher.pending
            prefetcher.request(index + 1)
            assert len(prefetcher.pending) <= 1
            for key, tensor in tensors.items():
                assert torch.equal(tensor, reference[f"{name}.{index}.{key}"]), key
            arena = prefetcher.arenas[index % 2].buffer
            start = arena.data_ptr()
            pointer = tensors["mlp.experts.down_proj"].data_ptr()
            assert start <= pointer < start + arena.numel()
            buffers.append(start)
    finally:
        prefetcher.close()
    assert buffers[0] == buffers[2] and buffers[1] == buffers[3] and buffers[0] != buffers[1]
