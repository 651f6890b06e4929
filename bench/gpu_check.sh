#!/usr/bin/env bash
# One prepared GPU check (about 3-5 minutes on an H100): install, kernel tests, layer benchmark.
#
# Run from the repository root on the GPU machine (no network):  OUT=/some/folder bash bench/gpu_check.sh
# Writes under $OUT: env.txt, pip.log, gpu_tests.log/.xml (real-shape bf16/fp16 tests),
# kernel_tests.log/.xml (the tiny-shape suite, compiled instead of interpreted), bench.log and
# bench_moe_layer.json (pytest-benchmark JSON with device and versions in machine_info.reap_fast).
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

step pip 60 "$PYTHON" -m pip install --no-deps --no-build-isolation -e .
step gpu_tests 120 "$PYTHON" -m pytest tests/test_kernels_gpu.py -q -rA -p no:cacheprovider --junitxml="$OUT/gpu_tests.xml"
step kernel_tests 75 "$PYTHON" -m pytest tests/test_kernels.py -q -rA -p no:cacheprovider --junitxml="$OUT/kernel_tests.xml"
if "$PYTHON" -c "import pytest_benchmark" 2>/dev/null; then
    step bench 105 "$PYTHON" -m pytest bench/test_moe_layer.py -q -p no:cacheprovider \
        --benchmark-json="$OUT/bench_moe_layer.json" --benchmark-columns=min,median,mean,rounds
else
    step bench 105 "$PYTHON" bench/test_moe_layer.py --json "$OUT/bench_moe_layer.json"
fi
echo "failed steps: $failed" | tee -a "$OUT/summary.txt"
exit "$failed"
