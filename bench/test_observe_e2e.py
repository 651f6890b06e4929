"""End-to-end observation time: layer streaming vs the model in memory, and a projection for the real job.

A random-weight Qwen3-MoE checkpoint is written to disk, then observed two ways on the same
calibration tokens (sequences of ``L`` tokens, no padding, as packed calibration rows):

    in_memory   ``from_pretrained`` onto the device (timed separately as ``load_s``), then every batch
                through the whole model (reap_fast's Observer, the engine ``auto`` picks)
    streaming   ``observe_streaming``: one decoder layer at a time read from the safetensors file,
                every batch through it, hidden states kept between layers (includes all weight reads)

On a GPU: the Qwen3-30B-A3B layer shapes (E=128, k=8, H=2048, I=768, 32 query / 4 KV heads of 128,
vocabulary 151936) in bf16, ``REAP_FAST_BENCH_LAYERS`` layers (default 6, ~1.25 GB each; the whole
48-layer model does not fit one GPU in memory next to its activations, which is the point of
streaming), ``REAP_FAST_BENCH_SAMPLES`` sequences (default 8) of 2048 tokens, batch size 1.
On a CPU-only machine only a tiny shape is run (E=8, k=2, H=64, I=32, 4 layers, 4 x 128 tokens, fp32),
to check that the suite works, never for speed: its projection is meaningless and says so.

Each benchmark's ``extra_info`` holds the shape, the per-2048-token-sample time, and the projection
for the real job (48 layers x 231 packed samples of 2048 tokens)::

    in_memory:  projected = 48 · 231 · t(layer, sample) + load time of 48 layers
    streaming:  projected = 48 · (weight read per layer) + 48 · 231 · t(layer, sample) + embedding pass

next to the 74 minutes upstream REAP reported for this job on 2 x RTX A6000 (different hardware:
compare with care). Run: ``pytest bench/test_observe_e2e.py --benchmark-json=bench/results/observe_e2e.json``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from functools import lru_cache

import torch

from reap_fast.config import ObserveConfig
from reap_fast.data import CalibrationSet
from reap_fast.observe.session import Observer
from reap_fast.observe.settings import process_settings
from reap_fast.observe.streaming import StreamingReport, observe_streaming
from reap_lab.tiny import build_model, byte_tokenizer, save_checkpoint, tiny_qwen3_moe_config

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
REAL_LAYERS, REAL_SAMPLES, REAL_LENGTH = 48, 231, 2048
UPSTREAM_MINUTES = 74.0  # Cerebras REAP, Qwen3-30B-A3B observation, 2 x RTX A6000
if CUDA:
    LAYERS = int(os.environ.get("REAP_FAST_BENCH_LAYERS", "6"))
    SAMPLES = int(os.environ.get("REAP_FAST_BENCH_SAMPLES", "8"))
    LENGTH = 2048
    DTYPE = torch.bfloat16
    SHAPE = dict(hidden_size=2048, moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8,
                 num_attention_heads=32, num_key_value_heads=4, head_dim=128, intermediate_size=6144,
                 vocab_size=151936, rms_norm_eps=1e-6, rope_theta=1e6)
else:
    LAYERS, SAMPLES, LENGTH, DTYPE = 4, 4, 128, torch.float32
    SHAPE = dict(hidden_size=64, moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2)
BATCH = 1


@lru_cache(maxsize=None)
def checkpoint() -> str:
    """A random-weight checkpoint at the benchmark shape (written once per session)."""
    folder = tempfile.mkdtemp(prefix="reap-fast-bench-")
    config = tiny_qwen3_moe_config(num_hidden_layers=LAYERS, **SHAPE)
    if CUDA:
        with torch.device("cuda"):
            model = build_model(config, seed=0, dtype=DTYPE)
    else:
        model = build_model(config, seed=0, dtype=DTYPE)
    save_checkpoint(model, byte_tokenizer(), folder)
    del model
    if CUDA:
        torch.cuda.empty_cache()
    return folder


@lru_cache(maxsize=None)
def calibration() -> CalibrationSet:
    generator = torch.Generator().manual_seed(0)
    vocab = SHAPE.get("vocab_size", 264)
    ids = torch.randint(0, min(vocab, 256), (SAMPLES, LENGTH), generator=generator)
    attention = torch.ones(SAMPLES, LENGTH, dtype=torch.long)
    return CalibrationSet(ids, attention, attention.bool(), ["bench"] * SAMPLES)


def _sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def _auto_engine() -> str:
    """The engine ``--engine auto`` resolves to for the benchmark's checkpoint on DEVICE."""
    from transformers import AutoConfig

    settings = ObserveConfig(device=DEVICE, dtype=str(DTYPE).removeprefix("torch."))
    return process_settings(settings, AutoConfig.from_pretrained(checkpoint())).engine


def _info(variant: str, seconds: float, per_layer_sample: float, fixed_48: float) -> dict:
    projected = fixed_48 + REAL_LAYERS * REAL_SAMPLES * per_layer_sample * (REAL_LENGTH / LENGTH)
    return {
        "variant": variant,
        "device": torch.cuda.get_device_name() if CUDA else "cpu (tiny shape: timings are not meaningful)",
        "shape": dict(SHAPE, layers=LAYERS, samples=SAMPLES, tokens_per_sample=LENGTH, batch_size=BATCH),
        "dtype": str(DTYPE),
        "engine": _auto_engine(),
        "seconds": seconds,
        "seconds_per_sample": seconds / SAMPLES,
        "seconds_per_layer_sample": per_layer_sample,
        "projected_real_job_minutes": projected / 60 if CUDA else None,
        "projection": f"{REAL_LAYERS} layers x {REAL_SAMPLES} samples x {REAL_LENGTH} tokens at the measured rates",
        "upstream_reported_minutes": UPSTREAM_MINUTES,
        "upstream_hardware": "2 x RTX A6000",
        "speedup_vs_upstream": (UPSTREAM_MINUTES * 60 / projected) if CUDA else None,
    }


def test_observe_in_memory(benchmark):
    from transformers import AutoModelForCausalLM

    started = time.perf_counter()
    held = {"model": AutoModelForCausalLM.from_pretrained(checkpoint(), dtype=DTYPE, device_map=DEVICE).eval()}
    _sync()
    load_s = time.perf_counter() - started
    engine = _auto_engine()

    def run():  # observe_checkpoint's in-memory loop, without loading the model
        with Observer(held["model"], engine=engine, renormalize=True) as observer:
            for batch in calibration().batches(BATCH):
                observer.forward(batch.input_ids, batch.attention_mask, batch.stats_mask)
        _sync()

    run()  # warm-up (kernel compilation, allocator)
    started = time.perf_counter()
    benchmark.pedantic(run, rounds=1, iterations=1)
    seconds = time.perf_counter() - started
    per_layer_sample = seconds / (LAYERS * SAMPLES)
    benchmark.extra_info.update(_info("in_memory", seconds, per_layer_sample, load_s * REAL_LAYERS / LAYERS))
    benchmark.extra_info["load_s"] = load_s
    held.clear()
    if CUDA:
        torch.cuda.empty_cache()


def test_observe_streaming(benchmark):
    engine = _auto_engine()
    reports = []

    def run():
        report = StreamingReport()
        settings = ObserveConfig(batch_size=BATCH, engine=engine, device=DEVICE, dtype=str(DTYPE).removeprefix("torch."),
                                 progress=False)
        observe_streaming(checkpoint(), calibration(), settings, report=report)
        _sync()
        reports.append(report)

    run()  # warm-up (page cache of the checkpoint, kernels)
    if CUDA:
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    benchmark.pedantic(run, rounds=1, iterations=1)
    seconds = time.perf_counter() - started
    report = reports[-1]
    # Split the time: weight reads per layer vs compute per (layer, sample); the report times both.
    load_per_layer = report.load_seconds / LAYERS
    per_layer_sample = report.compute_seconds / (LAYERS * SAMPLES)
    fixed = REAL_LAYERS * load_per_layer + report.embed_seconds
    benchmark.extra_info.update(_info("streaming", seconds, per_layer_sample, fixed))
    benchmark.extra_info.update(
        hidden_tier=report.tier,
        hidden_bytes=report.hidden_bytes,
        peak_weight_bytes=report.peak_weight_bytes,
        layer_weight_bytes=max(report.layer_bytes),
        load_seconds_per_layer=load_per_layer,
        peak_device_bytes=torch.cuda.max_memory_allocated() if CUDA else None,
    )


def teardown_module(module) -> None:
    if checkpoint.cache_info().currsize:
        shutil.rmtree(checkpoint(), ignore_errors=True)
