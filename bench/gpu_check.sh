#!/usr/bin/env bash
# One prepared GPU check that fits a 15-minute device window twice: every step has a budget (its timeout),
# the budgets add up to at most GPU_CHECK_LIMIT_S (480 s = 8 minutes) and are printed before each step,
# and the results are written after every step (summary.txt, steps.json), so a run cut short keeps what
# it finished.
#
#   OUT=/some/folder bash bench/gpu_check.sh            # on the GPU machine, from the repository root
#   OUT=/tmp/x bash bench/gpu_check.sh --dry-run        # anywhere: walks every step with its budget, runs
#                                                       # a mock (true) instead of the command, states the total
#
# Steps (name, budget s): env 10, install 20, gpu_tests 50 (real-shape bf16/fp16 tests, CUDA-graph capture of
# an observed layer, no host sync), kernel_tests 35 (the tiny-shape suite compiled), tune 110 (bench/tune.py
# over T = 256..16384 with its own --budget-s 95, merged into reap_kernels/configs/<device>.json), compile_check
# 30 (the configs this GPU uses: registers, spills, shared memory), bench 115 (one Qwen3-30B-A3B layer at
# T = 2048 and 8192: upstream's own observer.py hook when a snapshot is given, the HF eager experts loop,
# grouped_mm, batched_mm where it fits memory, Liger-Kernel's fused MoE if installed, the reference engine,
# the Triton kernels with and without statistics; ms, GB/s, TFLOPS and the roofline fraction per variant),
# bench_targets 15, merge_check 45 (bench/gpu_merge_check.py: upstream's five merging statistics through the
# Triton path at the real layer shape against float64, and the time and peak memory they add on a 2-layer
# model), e2e 40 (GPU_CHECK_E2E=0 skips it). Exit status: the number of failed steps.
set -u
DRY_RUN=0
[ "${1:-}" = "--dry-run" ] && DRY_RUN=1
OUT="${OUT:-$PWD/gpu_out}"
PYTHON="${PYTHON:-python}"
LIMIT_S="${GPU_CHECK_LIMIT_S:-480}"
mkdir -p "$OUT"
: >"$OUT/summary.txt"
echo "[]" >"$OUT/steps.json"
failed=0
spent=0

STEPS=(  # name budget_s
    "env 10" "install 20" "gpu_tests 50" "kernel_tests 35" "tune 110" "compile_check 30" "bench 115"
    "bench_targets 15" "merge_check 45" "e2e 40"
)
total=0
for entry in "${STEPS[@]}"; do total=$((total + ${entry#* })); done
echo "gpu_check: ${#STEPS[@]} steps, total budget ${total} s (limit ${LIMIT_S} s)$([ "$DRY_RUN" = 1 ] && echo ', dry run')" \
    | tee -a "$OUT/summary.txt"
if [ "$total" -gt "$LIMIT_S" ]; then
    echo "gpu_check: the step budgets exceed the limit" | tee -a "$OUT/summary.txt"
    exit 99
fi

budget_of() {  # budget_of NAME
    local entry
    for entry in "${STEPS[@]}"; do [ "${entry% *}" = "$1" ] && echo "${entry#* }" && return; done
    echo 0
}

record() {  # record NAME BUDGET RC SECONDS: append to steps.json (rewritten whole, atomically)
    "$PYTHON" - "$OUT/steps.json" "$1" "$2" "$3" "$4" "$DRY_RUN" <<'PY' 2>/dev/null || true
import json, os, sys
path, name, budget, rc, seconds, dry = sys.argv[1:]
steps = json.load(open(path))
steps.append({"step": name, "budget_s": int(budget), "rc": int(rc), "seconds": int(seconds), "dry_run": dry == "1"})
with open(path + ".tmp", "w") as handle:
    json.dump(steps, handle, indent=1)
os.replace(path + ".tmp", path)
PY
}

step() {  # step NAME CMD...: run CMD under the step's budget, log to $OUT/NAME.log, record the result
    local name=$1 limit
    shift
    limit=$(budget_of "$name")
    echo "[$name] budget ${limit} s (spent so far ${spent} s of ${total} s)" | tee -a "$OUT/summary.txt"
    local start=$SECONDS rc
    if [ "$DRY_RUN" = 1 ]; then
        echo "mock of: $*" >"$OUT/$name.log"
        timeout "$limit" true
    else
        timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    fi
    rc=$?
    local took=$((SECONDS - start))
    spent=$((spent + limit))
    echo "[$name] rc=$rc in ${took} s" | tee -a "$OUT/summary.txt"
    record "$name" "$limit" "$rc" "$took"
    [ "$DRY_RUN" = 1 ] || tail -n 20 "$OUT/$name.log"
    [ "$rc" -eq 0 ] || failed=$((failed + 1))
}

env_info() {
    nvidia-smi || true
    "$PYTHON" -c "import torch, triton, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda); print('triton', triton.__version__); print('transformers', transformers.__version__); print(torch.cuda.get_device_name())"
    "$PYTHON" -c "import pytest_benchmark; print('pytest-benchmark', pytest_benchmark.__version__)" || echo "pytest-benchmark missing"
    "$PYTHON" -c "import liger_kernel; print('liger-kernel present')" || echo "liger-kernel absent (its baseline is skipped)"
}

install() {  # the package in development mode, else the two packages and reap_lab/ through symlinks; Liger if pip finds it
    "$PYTHON" -m pip install --no-deps --no-build-isolation -e . || {
        links=$(mktemp -d) && ln -s "$PWD/reap_fast" "$links/reap_fast" && ln -s "$PWD/reap_kernels" "$links/reap_kernels" \
            && ln -s "$PWD/reap_lab" "$links/reap_lab" \
            && echo "$links" >"$OUT/pythonpath.txt" && echo "not installed; importing through $links"
    }
    "$PYTHON" -m pip install --no-deps liger-kernel 2>&1 | tail -n 2 || true
}

device_config() {  # where reap_kernels.config looks first on this GPU
    "$PYTHON" -c "import torch; from reap_kernels.config import CONFIG_DIR, device_file_name; print(CONFIG_DIR / device_file_name(torch.cuda.get_device_name()))"
}

step env env_info
step install install
[ -s "$OUT/pythonpath.txt" ] && export PYTHONPATH="$(cat "$OUT/pythonpath.txt")${PYTHONPATH:+:$PYTHONPATH}"
PYTEST=("$PYTHON" -m pytest -q -rA -p no:cacheprovider)
step gpu_tests "${PYTEST[@]}" tests/test_kernels_gpu.py tests/test_registered_op.py tests/test_launches.py \
    --junitxml="$OUT/gpu_tests.xml"
step kernel_tests "${PYTEST[@]}" tests/test_kernels.py --junitxml="$OUT/kernel_tests.xml"
DEVICE_CONFIG=$([ "$DRY_RUN" = 1 ] && echo "$OUT/device_config.json" || device_config 2>/dev/null || echo "$OUT/device_config.json")
step tune "$PYTHON" bench/tune.py --out "$OUT/tuned_configs.json" --budget-s 95 --merge-into "$DEVICE_CONFIG"
[ -s "$DEVICE_CONFIG" ] && cp "$DEVICE_CONFIG" "$OUT/device_config.json" 2>/dev/null
arch=$([ "$DRY_RUN" = 1 ] && echo 90 || "$PYTHON" -c "import torch; major, minor = torch.cuda.get_device_capability(); print(10 * major + minor)")
step compile_check "$PYTHON" -m reap_lab.compile_check --arch "${arch:-90}" --json "$OUT/compile_check.json"
step bench "${PYTEST[@]}" bench/test_moe_layer.py --benchmark-json="$OUT/bench_moe_layer.json" \
    --benchmark-columns=min,median,rounds
REAP_FAST_BENCH_JSON="$OUT/bench_moe_layer.json" step bench_targets "${PYTEST[@]}" tests/test_bench_targets.py
step merge_check "$PYTHON" bench/gpu_merge_check.py --samples 2 --json "$OUT/merge_check.json"
if [ "${GPU_CHECK_E2E:-1}" = 1 ]; then
    REAP_FAST_BENCH_LAYERS=2 REAP_FAST_BENCH_SAMPLES=4 step e2e "${PYTEST[@]}" bench/test_observe_e2e.py \
        --benchmark-json="$OUT/bench_observe_e2e.json" --benchmark-columns=min,median,rounds
fi
echo "failed steps: $failed; budgets spent ${spent} s of ${total} s (limit ${LIMIT_S} s)" | tee -a "$OUT/summary.txt"
exit "$failed"
