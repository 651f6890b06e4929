"""Benchmark set-up: the Triton interpreter on CPU-only machines, and the environment in the JSON.

Every benchmark JSON (``--benchmark-json``) gets ``machine_info.reap_fast`` with the device name,
the torch / triton / transformers versions and whether the interpreter ran; each benchmark's
``extra_info`` carries its shape, dtype and variant (set in the bench files).
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton


def environment_info() -> dict:
    import transformers

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    cuda = torch.cuda.is_available()
    return {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "capability": ".".join(map(str, torch.cuda.get_device_capability())) if cuda else None,
        "torch": torch.__version__,
        "triton": triton_version,
        "transformers": transformers.__version__,
        "cuda": torch.version.cuda,
        "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1",
    }


def pytest_benchmark_update_json(config, benchmarks, output_json):
    output_json.setdefault("machine_info", {})["reap_fast"] = environment_info()
