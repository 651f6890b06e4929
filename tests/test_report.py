"""bench/report.py: layer tables with speed-ups, and the separate end-to-end observation table."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("reap_bench_report", ROOT / "bench" / "report.py")
report = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(report)

DEVICE = "NVIDIA H100 80GB HBM3"
ENV = {"device": DEVICE, "torch": "2.11.0", "triton": "3.6.0", "transformers": "5.17.0"}


def _bench(name: str, median: float, extra: dict) -> dict:
    return {"name": name, "stats": {"median": median, "min": median * 0.9, "rounds": 5}, "extra_info": extra}


def write_results(tmp_path: Path) -> Path:
    shape = {"E": 128, "k": 8, "H": 2048, "I": 768, "T": 2048, "dtype": "bfloat16", "device": DEVICE}
    e2e_shape = {"layers": 2, "samples": 4, "tokens_per_sample": 2048}
    e2e = {"projection": "48 layers x 231 samples x 2048 tokens at the measured rates", "device": DEVICE,
           "shape": e2e_shape, "upstream_reported_minutes": 74.0, "upstream_hardware": "2 x RTX A6000"}
    data = {
        "machine_info": {"reap_fast": ENV},
        "benchmarks": [
            _bench("test_layer[upstream_hook-2048]", 0.100, {**shape, "variant": "upstream_hook"}),
            _bench("test_layer[triton_stats-2048]", 0.001, {**shape, "variant": "triton_stats"}),
            _bench("test_observe_in_memory", 0.8, {**e2e, "variant": "in_memory", "seconds_per_sample": 0.2,
                                                   "seconds_per_layer_sample": 0.05, "projected_real_job_minutes": 9.25}),
            _bench("test_observe_streaming", 1.2, {**e2e, "variant": "streaming", "seconds_per_sample": 0.3,
                                                   "seconds_per_layer_sample": 0.07, "projected_real_job_minutes": 14.8}),
        ],
    }
    path = tmp_path / "gpu.json"
    path.write_text(json.dumps(data))
    return path


def test_layer_and_end_to_end_rows_are_reported_apart(tmp_path):
    rows, end_to_end = report.split_kinds(report.load_measurements([write_results(tmp_path)]))
    assert sorted(r["variant"] for r in rows) == ["triton_stats", "upstream_hook"]
    assert sorted(r["variant"] for r in end_to_end) == ["in_memory", "streaming"]

    layer_text = report.markdown(report.add_speedups(rows))
    assert "100.00x" in layer_text and "in_memory" not in layer_text  # 0.100 s / 1 ms

    text = report.markdown_end_to_end(end_to_end)
    lines = {line.split(" | ")[1]: line for line in text.splitlines() if line.startswith(f"| {DEVICE}")}
    assert set(lines) == {"in_memory", "streaming"}
    assert "2 layers x 4 x 2048 tokens" in lines["in_memory"] and "200.00 ms" in lines["in_memory"]
    assert "9.2 min" in lines["in_memory"] and "(8x faster)" in lines["in_memory"]  # 74 / 9.25
    assert "14.8 min" in lines["streaming"] and "(5x faster)" in lines["streaming"]


def test_cpu_end_to_end_rows_have_no_projection(tmp_path):
    row = report._end_to_end_row("cpu.json", "cpu", "streaming", {"projection": "p", "shape": {"layers": 4},
                                                                   "projected_real_job_minutes": None}, {})
    assert "not meaningful" in report.markdown_end_to_end([row])
