#!/usr/bin/env bash
# Device calls for the lent H200, in back-to-back pairs (the machine stays warm 30 s between calls,
# and the FA4 wheels, too large for one call, travel in two pieces: .whl/a, then .whl/b).
#   estimate  (carries .whl/a): FP8 vs bf16 estimate, every kept config forced at 128k, the
#             estimate benchmark with full tuning, short-call profile; keeps the wheel piece.
#   sparse    (carries .whl/b): installs FA4, then the sparse head-to-head (GQA, MHA) against FA4
#             block-sparse / dense, cuDNN and FlexAttention on the same masks.
#   tests     (carries .whl/a): every GPU test (all kept configs, outputs poisoned), short calls.
#   e2e       (carries .whl/b): FA4 tests, whole xattention() with bf16 and FP8 estimates.
# Results go to $OUT/r and come back as one archive per call.
set -uo pipefail
phase=$1
r=$OUT/r
mkdir -p "$r"
export PYTHONUNBUFFERED=1 XATTENTION_BENCH_OUT=$r TRITON_INTERPRET=0
export PYTHONPATH=$PWD/src:$PWD/tests
step() { echo "== $1 ($(date -u +%T))"; }
install_fa4() {
  cat /tmp/cu13.partaa .whl/b/cu13.partab > /tmp/nvidia_cutlass_dsl_libs_cu13-4.8.1-cp312-cp312-manylinux_2_28_x86_64.whl
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/b/*.whl /tmp/nvidia_cutlass_dsl_libs_cu13-*.whl || exit 3
  export PYTHONPATH=$PYTHONPATH:/tmp/site:/tmp/site/nvidia_cutlass_dsl/dsl_packages
  python -c "import flash_attn.cute; print('fa4 ok')" || exit 4
}
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv | tee "$r/gpu.txt"
case $phase in
estimate)
  cp .whl/a/* /tmp/
  cd benchmarks
  step estimate-sweep
  timeout 300 python bench_estimate.py --lengths 32k,128k --kv-heads 8 --estimate-dtypes bf16,fp8 \
    --sweep 128k --name estimate_gqa > "$r/estimate.log" 2>&1
  grep -v "^{" "$r/estimate.log" | tail -30
  step short-calls
  XATTENTION_AUTOTUNE=quick timeout 90 python bench_short_calls.py --lengths 1k,4k,8k \
    > "$r/short.log" 2>&1; tail -22 "$r/short.log"
  ;;
sparse)
  install_fa4
  cd benchmarks
  step sparse-gqa
  XATTENTION_AUTOTUNE=quick timeout 270 python bench_sparse_attention.py --lengths 32k,128k \
    --heads 32 --kv-heads 8 --name sparse_attention_gqa > "$r/sparse_gqa.log" 2>&1
  tail -16 "$r/sparse_gqa.log"
  step sparse-mha
  XATTENTION_AUTOTUNE=quick timeout 200 python bench_sparse_attention.py --lengths 32k,128k \
    --heads 32 --kv-heads 32 --no-flex --name sparse_attention_mha > "$r/sparse_mha.log" 2>&1
  tail -12 "$r/sparse_mha.log"
  ;;
tests)
  cp .whl/a/* /tmp/
  step fp8-accumulation
  (cd benchmarks && timeout 150 python bench_estimate.py --kv-heads 8 --lengths 32k \
    --strides 8 --estimate-dtypes fp8 --fp8-accumulation 0,128,64,32 --name estimate_gqa \
    > "$r/fp8_acc.log" 2>&1); grep -v "^{" "$r/fp8_acc.log" | tail -14
  step tests
  XATTENTION_AUTOTUNE=quick timeout 420 python -m pytest -q -n 14 -p no:cacheprovider \
    --maxfail=30 tests/test_gpu_kernels.py -k "not fa4" > "$r/gpu_tests.log" 2>&1
  tail -4 "$r/gpu_tests.log"; grep -E "^FAILED|Error" "$r/gpu_tests.log" | head -20
  cd benchmarks
  step short-calls
  XATTENTION_AUTOTUNE=quick timeout 90 python bench_short_calls.py --lengths 1k,4k,8k \
    > "$r/short.log" 2>&1; tail -22 "$r/short.log"
  ;;
e2e)
  install_fa4
  step fa4-tests
  XATTENTION_AUTOTUNE=quick timeout 200 python -m pytest -q -p no:cacheprovider \
    tests/test_gpu_kernels.py -k "fa4" > "$r/gpu_tests_fa4.log" 2>&1
  tail -4 "$r/gpu_tests_fa4.log"; grep -E "^FAILED|Error" "$r/gpu_tests_fa4.log" | head -20
  cd benchmarks
  step xattention
  timeout 300 python bench_xattention.py --lengths 32k,128k --heads 32 --kv-heads 8 \
    --thresholds 0.9 --estimate-dtypes bf16,fp8 --name xattention_gqa > "$r/xattention.log" 2>&1
  tail -20 "$r/xattention.log"
  step crossover
  XATTENTION_AUTOTUNE=quick timeout 100 python bench_xattention.py --crossover 32/8,8/2 \
    --lengths 1k,2k,4k,8k,16k > "$r/crossover.log" 2>&1; tail -24 "$r/crossover.log"
  ;;
final)
  step tests
  XATTENTION_AUTOTUNE=quick timeout 200 python -m pytest -q -n 14 -p no:cacheprovider \
    --maxfail=30 tests/test_gpu_kernels.py > "$r/gpu_tests.log" 2>&1
  tail -3 "$r/gpu_tests.log"; grep -E "^FAILED" "$r/gpu_tests.log" | head -20
  cd benchmarks
  step short-calls
  XATTENTION_AUTOTUNE=quick timeout 70 python bench_short_calls.py --lengths 1k,4k,8k \
    > "$r/short.log" 2>&1; grep -A30 "  L  heads" "$r/short.log" | tail -24
  step estimate
  XATTENTION_AUTOTUNE=quick timeout 90 python bench_estimate.py --lengths 32k,128k --kv-heads 8 \
    --estimate-dtypes bf16,fp8 --name estimate_gqa > "$r/estimate.log" 2>&1
  tail -9 "$r/estimate.log"
  step crossover
  XATTENTION_AUTOTUNE=quick timeout 110 python bench_xattention.py --crossover 32/8,8/2 \
    --lengths 1k,2k,4k,8k,16k > "$r/crossover.log" 2>&1; tail -22 "$r/crossover.log"
  ;;
short)
  cd benchmarks
  step short-calls
  XATTENTION_AUTOTUNE=quick timeout 70 python bench_short_calls.py --lengths 1k,4k,8k \
    > "$r/short.log" 2>&1; grep -A30 "  L  heads" "$r/short.log" | tail -24
  step crossover
  XATTENTION_AUTOTUNE=quick timeout 110 python bench_xattention.py --crossover 32/8,8/2 \
    --lengths 1k,2k,4k,8k,16k > "$r/crossover.log" 2>&1; tail -22 "$r/crossover.log"
  ;;
e2e_sparse)
  install_fa4
  step fa4-tests
  XATTENTION_AUTOTUNE=quick timeout 110 python -m pytest -q -p no:cacheprovider -n 4 \
    tests/test_gpu_kernels.py -k "fa4" > "$r/gpu_tests_fa4.log" 2>&1
  tail -3 "$r/gpu_tests_fa4.log"; grep -E "^FAILED" "$r/gpu_tests_fa4.log" | head -10
  cd benchmarks
  step sparse-gqa
  XATTENTION_AUTOTUNE=quick timeout 240 python bench_sparse_attention.py --lengths 32k,128k \
    --heads 32 --kv-heads 8 --name sparse_attention_gqa > "$r/sparse_gqa.log" 2>&1
  tail -16 "$r/sparse_gqa.log"
  step xattention
  XATTENTION_AUTOTUNE=quick timeout 190 python bench_xattention.py --lengths 32k,128k \
    --heads 32 --kv-heads 8 --thresholds 0.9 --estimate-dtypes bf16,fp8 --name xattention_gqa \
    > "$r/xattention.log" 2>&1; tail -22 "$r/xattention.log"
  ;;
esac
tar czf "$OUT/results_$phase.tgz" -C "$OUT" r
