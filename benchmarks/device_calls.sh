#!/usr/bin/env bash
# Two back-to-back device calls (the machine stays warm 30 s between them):
#   one: GPU tests of every kept Triton config, short-input crossover, estimate timings; stores
#        the first piece of the cutlass-dsl cu13 wheel (too large for one call) in /tmp.
#   two: joins and installs the FA4 wheels into /tmp/site, FA4 tests, sparse and end-to-end
#        benchmarks with the FA4 baselines.
# Results go to $OUT/r and come back as one archive (the tool returns at most 8 files).
set -uo pipefail
phase=$1
r=$OUT/r
mkdir -p "$r"
export PYTHONUNBUFFERED=1 XATTENTION_BENCH_OUT=$r TRITON_INTERPRET=0
export PYTHONPATH=$PWD/src:$PWD/tests
step() { echo "== $1 ($(date -u +%T))"; }
if [[ $phase == one ]]; then
  cp ../.whl/a/* /tmp/
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv | tee "$r/gpu.txt"
  step tests
  XATTENTION_AUTOTUNE=quick timeout 330 python -m pytest -q -n 14 -p no:cacheprovider \
    --maxfail=30 tests/test_gpu_kernels.py -k "not fa4" > "$r/gpu_tests.log" 2>&1
  tail -4 "$r/gpu_tests.log"; grep -E "^FAILED|Error" "$r/gpu_tests.log" | head -20
  cd benchmarks
  step crossover
  XATTENTION_AUTOTUNE=quick timeout 120 python bench_xattention.py --crossover 32/8,32/32,8/2 \
    --lengths 1k,2k,4k,8k,16k > "$r/crossover.log" 2>&1; tail -32 "$r/crossover.log"
  step estimate
  timeout 100 python bench_estimate.py --lengths 32k,128k > "$r/estimate.log" 2>&1
  tail -12 "$r/estimate.log"
else
  cat /tmp/cu13.partaa ../.whl/b/cu13.partab > /tmp/nvidia_cutlass_dsl_libs_cu13-4.8.1-cp312-cp312-manylinux_2_28_x86_64.whl
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site ../.whl/b/*.whl /tmp/nvidia_cutlass_dsl_libs_cu13-*.whl || exit 3
  export PYTHONPATH=$PYTHONPATH:/tmp/site:/tmp/site/nvidia_cutlass_dsl/dsl_packages
  python -c "import flash_attn.cute as f; print('fa4 ok')" || exit 4
  step fa4-tests
  XATTENTION_AUTOTUNE=quick timeout 200 python -m pytest -q -p no:cacheprovider \
    tests/test_gpu_kernels.py -k "fa4 or short_inputs" > "$r/gpu_tests_fa4.log" 2>&1
  tail -4 "$r/gpu_tests_fa4.log"; grep -E "^FAILED|Error" "$r/gpu_tests_fa4.log" | head -20
  cd benchmarks
  step sparse-gqa
  timeout 150 python bench_sparse_attention.py --lengths 32k,128k --heads 32 --kv-heads 8 \
    --name sparse_attention_gqa > "$r/sparse_gqa.log" 2>&1; tail -16 "$r/sparse_gqa.log"
  step sparse-mha
  timeout 110 python bench_sparse_attention.py --lengths 32k,128k --heads 32 --kv-heads 32 \
    --no-flex --name sparse_attention_mha > "$r/sparse_mha.log" 2>&1
  tail -12 "$r/sparse_mha.log"
  step xattention
  timeout 130 python bench_xattention.py --lengths 32k,128k --heads 32 --kv-heads 8 \
    --thresholds 0.9 --name xattention_gqa > "$r/xattention.log" 2>&1; tail -14 "$r/xattention.log"
fi
tar czf "$OUT/results_$phase.tgz" -C "$OUT" r
