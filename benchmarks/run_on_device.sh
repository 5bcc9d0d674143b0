#!/usr/bin/env bash
# One device call: GPU correctness tests, then the benchmarks; results land in $OUT (or results/).
# Usage: bash benchmarks/run_on_device.sh [tests|bench|all] [lengths]
set -uo pipefail
cd "$(dirname "$0")/.."
what=${1:-all}
lengths=${2:-8k,32k,128k}
out=${OUT:-benchmarks/results}
mkdir -p "$out"
# The device image cannot build packages offline: import from the source tree.
export PYTHONUNBUFFERED=1 XATTENTION_BENCH_OUT="$out" PYTHONPATH=$PWD/src TRITON_INTERPRET=0
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv | tee "$out/gpu.txt"
if [[ $what == tests || $what == all ]]; then
  XATTENTION_AUTOTUNE=quick python -m pytest -q -x tests/test_gpu_kernels.py 2>&1 | tee "$out/gpu_tests.log" | tail -25
fi
if [[ $what == bench || $what == all ]]; then
  cd benchmarks
  python bench_sparse_attention.py --lengths "$lengths" 2>&1 | tee "$out/bench_sparse.log" | tail -20
  python bench_estimate.py --lengths "$lengths" 2>&1 | tee "$out/bench_estimate.log" | tail -12
  python bench_xattention.py --lengths "$lengths" 2>&1 | tee "$out/bench_xattention.log" | tail -12
fi
