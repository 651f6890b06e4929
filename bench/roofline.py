"""Roofline of one routed MoE layer: bytes and FLOPs of the routed work, and the device's peaks.

Every variant of ``bench/test_moe_layer.py`` computes (at least) the routed forward of one layer, so all
are measured against the same floor: the expert weights read once, the activations read and the output
written (bytes), and 2 x 3 x H x I multiply-adds per routed pair (FLOPs). Peaks are the vendors' dense
16-bit tensor-core and memory figures for the named device (None: unknown device, no fraction given).
"""

from __future__ import annotations

PEAKS = {  # substring of torch.cuda.get_device_name() -> (memory GB/s, dense bf16/fp16 TFLOP/s), vendor figures
    "H200": (4800.0, 989.0),
    "H100 PCIe": (2000.0, 756.0),
    "H100": (3350.0, 989.0),
    "A100-SXM4-80GB": (2039.0, 312.0),
    "A100": (1555.0, 312.0),
    "RTX A6000": (768.0, 155.0),
    "RTX 3090": (936.0, 71.0),
    "RTX 4090": (1008.0, 165.0),
    "L40S": (864.0, 362.0),
    "L40": (864.0, 181.0),
}


def peaks(device_name: str) -> tuple[float, float] | None:
    for key, value in PEAKS.items():
        if key in device_name:
            return value
    return None


def routed_work(shape: dict, num_tokens: int, element_bytes: int) -> tuple[float, float]:
    """(bytes, FLOPs) of one layer's routed forward: weights once + x + out; 6 H I FLOPs per routed pair."""
    experts, top_k, hidden, inter = shape["E"], shape["k"], shape["H"], shape["I"]
    weights = experts * 3 * hidden * inter * element_bytes
    activations = 2 * num_tokens * hidden * element_bytes
    return float(weights + activations), float(6 * hidden * inter * num_tokens * top_k)


def throughput(shape: dict, num_tokens: int, element_bytes: int, seconds: float, device_name: str) -> dict:
    """Achieved GB/s and TFLOP/s of the routed work in ``seconds``, and the fraction of the roofline."""
    work_bytes, flops = routed_work(shape, num_tokens, element_bytes)
    result = {"GB_per_s": round(work_bytes / seconds / 1e9, 1), "TFLOP_per_s": round(flops / seconds / 1e12, 2)}
    peak = peaks(device_name)
    if peak is not None:
        roofline_s = max(work_bytes / (peak[0] * 1e9), flops / (peak[1] * 1e12))
        result.update(roofline_ms=round(roofline_s * 1e3, 4), fraction_of_roofline=round(roofline_s / seconds, 3))
    return result
