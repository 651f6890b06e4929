#!/usr/bin/env bash
# One prepared GPU check (at most 9 minutes of step limits): install, kernel tests, tuning, compile
# check of the installed configs for this GPU, layer and end-to-end benchmarks.
#
# Run from the repository root on the GPU machine (no network):  OUT=/some/folder bash bench/gpu_check.sh
# Writes under $OUT: env.txt, pip.log, gpu_tests.log/.xml (real-shape bf16/fp16 tests),
# kernel_tests.log/.xml (the tiny-shape suite, compiled instead of interpreted), tune.log and
# tuned_configs.json (bench/tune.py at the real layer shape; installed as this device's config file),
# compile_check.md/.json (every config this GPU would use, tuned file included, compiled for its
# compute capability: registers, spills, shared memory),
# bench_configs.txt (the config file and block sizes the benchmark runs with), bench.log and
# bench_moe_layer.json (pytest-benchmark JSON with device and versions in machine_info.reap_fast),
# e2e.log and bench_observe_e2e.json (whole-model observation, 2 layers at the real shape).
# Exit status: 0 when every step passed, else the number of failed steps.
set -u
OUT="${OUT:-$PWD/gpu_out}"
PYTHON="${PYTHON:-python}"
mkdir -p "$OUT"
failed=0
step() {  # step NAME TIMEOUT_S CMD...: run with a timeout, log to $OUT/NAME.log, count failures
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    echo "[$name] rc=$rc in $((SECONDS - start)) s" | tee -a "$OUT/summary.txt"
    tail -n 25 "$OUT/$name.log"
    [ "$rc" -eq 0 ] || failed=$((failed + 1))
}

{
    nvidia-smi || true
    "$PYTHON" -c "import torch, triton, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda); print('triton', triton.__version__); print('transformers', transformers.__version__); print(torch.cuda.get_device_name())"
    "$PYTHON" -c "import pytest_benchmark; print('pytest-benchmark', pytest_benchmark.__version__)" || echo "pytest-benchmark missing"
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

step pip 30 "$PYTHON" -m pip install --no-deps --no-build-isolation -e .
if ! "$PYTHON" -c "import reap_fast, reap_kernels" 2>/dev/null; then
    # No install (e.g. no setuptools in an offline image): import the two packages through symlinks.
    links=$(mktemp -d)
    ln -s "$PWD/reap_fast" "$links/reap_fast" && ln -s "$PWD/kernels" "$links/reap_kernels"
    export PYTHONPATH="$links${PYTHONPATH:+:$PYTHONPATH}"
    echo "[pip] not installed; importing through $links" | tee -a "$OUT/summary.txt"
fi
step gpu_tests 100 "$PYTHON" -m pytest tests/test_kernels_gpu.py -q -rA -p no:cacheprovider --junitxml="$OUT/gpu_tests.xml"
step kernel_tests 50 "$PYTHON" -m pytest tests/test_kernels.py -q -rA -p no:cacheprovider --junitxml="$OUT/kernel_tests.xml"

# Tune the real layer shape (T = 256, 2048, 8192); the file is rewritten after every token count, so a
# timed-out run still leaves the finished ones. Installed where reap_kernels.config looks first.
step tune 100 "$PYTHON" bench/tune.py --out "$OUT/tuned_configs.json" --budget-s 78
if [ -s "$OUT/tuned_configs.json" ]; then
    device_config=$(timeout 20 "$PYTHON" -c "import torch; from reap_kernels.config import CONFIG_DIR, device_file_name; print(CONFIG_DIR / device_file_name(torch.cuda.get_device_name()))") \
        && cp "$OUT/tuned_configs.json" "$device_config" \
        && echo "[tune] installed as $device_config" | tee -a "$OUT/summary.txt" \
        || echo "[tune] not installed" | tee -a "$OUT/summary.txt"
fi
arch=$(timeout 20 "$PYTHON" -c "import torch; major, minor = torch.cuda.get_device_capability(); print(10 * major + minor)")
step compile_check 40 "$PYTHON" -m reap_kernels.compile_check --arch "${arch:-90}" --json "$OUT/compile_check.json"
cp "$OUT/compile_check.log" "$OUT/compile_check.md" 2>/dev/null || true
timeout 20 "$PYTHON" - >"$OUT/bench_configs.txt" 2>&1 <<'PY'
import torch
from reap_kernels.config import CONFIG_DIR, device_file_name, get_config

path = CONFIG_DIR / device_file_name(torch.cuda.get_device_name())
print("device config file:", path, "(present)" if path.is_file() else "(absent: default.json only)")
for tokens in (2048, 8192):
    print(f"T={tokens} bf16:", get_config(128, 2048, 768, 8, tokens, torch.bfloat16).to_dict())
PY
cat "$OUT/bench_configs.txt"

if "$PYTHON" -c "import pytest_benchmark" 2>/dev/null; then
    step bench 90 "$PYTHON" -m pytest bench/test_moe_layer.py -q -p no:cacheprovider \
        --benchmark-json="$OUT/bench_moe_layer.json" --benchmark-columns=min,median,mean,rounds
else
    step bench 90 "$PYTHON" bench/test_moe_layer.py --json "$OUT/bench_moe_layer.json"
fi
# The README's speed targets, asserted from the JSON just written (tests/test_bench_targets.py).
REAP_FAST_BENCH_JSON="$OUT/bench_moe_layer.json" step bench_targets 30 "$PYTHON" -m pytest tests/test_bench_targets.py \
    -q -rA -p no:cacheprovider
# Last and optional (GPU_CHECK_E2E=0 skips it): whole-model observation, in memory and streamed, on a
# 2-layer random checkpoint at the real shape, with the projection for the 48-layer job.
if [ "${GPU_CHECK_E2E:-1}" = 1 ] && "$PYTHON" -c "import pytest_benchmark" 2>/dev/null; then
    REAP_FAST_BENCH_LAYERS=2 REAP_FAST_BENCH_SAMPLES=4 step e2e 70 "$PYTHON" -m pytest bench/test_observe_e2e.py -q \
        -p no:cacheprovider --benchmark-json="$OUT/bench_observe_e2e.json" --benchmark-columns=min,median,rounds
fi
echo "failed steps: $failed" | tee -a "$OUT/summary.txt"
exit "$failed"
