#!/usr/bin/env bash
# Device calls for the lent H200 (run 10's steps, reusable). The FA4 wheels are too large for one
# call, so they travel in two pieces in back-to-back calls (the machine stays warm 30 s):
#   bash benchmarks/device_calls.sh tests    carry .whl/a: every GPU test (all kept configs,
#                                            outputs poisoned), short calls; keeps the piece
#   bash benchmarks/device_calls.sh bench    carry .whl/b: installs FA4, its tests, the sparse
#                                            head to head, the estimate, xattention(), crossover
#   bash benchmarks/device_calls.sh sweep    every kept estimate config at 128k, bf16 and FP8
# .whl/a holds the first half of the cutlass-dsl cu13 wheel (split -b 46M), .whl/b the second
# half and the other wheels: flash-attn-4 4.0.0b36, nvidia-cutlass-dsl(-libs-base, -libs-core)
# 4.8.1, quack-kernels 0.6.5, apache-tvm-ffi 0.1.15.post2, torch-c-dlpack-ext 0.1.5. Results go
# to $OUT/r and come back as one archive per call.
set -uo pipefail
phase=$1
r=$OUT/r
mkdir -p "$r"
export PYTHONUNBUFFERED=1 XATTENTION_BENCH_OUT=$r TRITON_INTERPRET=0
export PYTHONPATH=$PWD/src:$PWD/tests
step() { echo "== $1 ($(date -u +%T))"; }
quick() { XATTENTION_AUTOTUNE=quick timeout "$@"; }
install_fa4() {
  cat /tmp/cu13.partaa .whl/b/cu13.partab > /tmp/nvidia_cutlass_dsl_libs_cu13-4.8.1-cp312-cp312-manylinux_2_28_x86_64.whl
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/b/*.whl /tmp/nvidia_cutlass_dsl_libs_cu13-*.whl || exit 3
  export PYTHONPATH=$PYTHONPATH:/tmp/site:/tmp/site/nvidia_cutlass_dsl/dsl_packages
  python -c "import flash_attn.cute; print('fa4 ok')" || exit 4
}
gpu_tests() {  # $1: pytest -k expression, $2: log name, $3: seconds
  step "tests ($1)"
  quick "$3" python -m pytest -q -n 14 -p no:cacheprovider --maxfail=30 \
    tests/test_gpu_kernels.py -k "$1" > "$r/$2.log" 2>&1
  tail -3 "$r/$2.log"; grep -E "^FAILED" "$r/$2.log" | head -20
}
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv | tee "$r/gpu.txt"
case $phase in
tests)
  cp .whl/a/* /tmp/
  gpu_tests "not fa4" gpu_tests 300
  cd benchmarks
  step short-calls
  quick 70 python bench_short_calls.py --lengths 1k,4k,8k > "$r/short.log" 2>&1
  grep -A30 "  L  heads" "$r/short.log" | tail -24
  ;;
bench)
  install_fa4
  gpu_tests "fa4" gpu_tests_fa4 110
  cd benchmarks
  step sparse-gqa
  quick 240 python bench_sparse_attention.py --lengths 32k,128k --heads 32 --kv-heads 8 \
    --name sparse_attention_gqa > "$r/sparse_gqa.log" 2>&1; tail -16 "$r/sparse_gqa.log"
  step estimate
  quick 90 python bench_estimate.py --lengths 32k,128k --kv-heads 8 --estimate-dtypes bf16,fp8 \
    --name estimate_gqa > "$r/estimate.log" 2>&1; tail -9 "$r/estimate.log"
  step xattention
  quick 190 python bench_xattention.py --lengths 32k,128k --heads 32 --kv-heads 8 \
    --thresholds 0.9 --estimate-dtypes bf16,fp8 --name xattention_gqa > "$r/xattention.log" 2>&1
  tail -22 "$r/xattention.log"
  step crossover
  quick 110 python bench_xattention.py --crossover 32/8,8/2 --lengths 1k,2k,4k,8k,16k \
    > "$r/crossover.log" 2>&1; tail -22 "$r/crossover.log"
  ;;
sweep)
  cd benchmarks
  step estimate-sweep
  timeout 300 python bench_estimate.py --lengths 128k --kv-heads 8 --estimate-dtypes bf16,fp8 \
    --sweep 128k --name estimate_gqa > "$r/estimate.log" 2>&1
  grep -v "^{" "$r/estimate.log" | tail -30
  ;;
*)
  echo "unknown phase $phase (tests, bench, sweep)" >&2; exit 2
  ;;
esac
tar czf "$OUT/results_$phase.tgz" -C "$OUT" r
