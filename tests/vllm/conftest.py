"""Engine fixtures for the vLLM backend tests (run in their own environment: .ci/stage_vllm.sh).

Without vLLM only the tests that do not need it are collected (gather_kv, settings parsing).
Every engine is created in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``: one vLLM import,
no engine-core process to spawn) and shut down before the next one starts; each test module uses
one engine. CPU engines need float32, an explicit KV-cache size and eager mode keeps start-up short;
the same arguments start the CUDA engine (``eval/gpu/vllm_cuda.sh tests`` runs this folder there).
"""

from __future__ import annotations

import contextlib
import gc
import importlib.util
import os
from collections.abc import Iterator

import pytest

# tests/ is on sys.path, so this very folder is a namespace package named "vllm": only a real
# package (one with an __init__.py, hence an origin) counts.
_spec = importlib.util.find_spec("vllm")
HAVE_VLLM = _spec is not None and _spec.origin is not None
NEEDS_VLLM = ["test_engine_equal.py", "test_engine_needle.py", "test_engine_layout.py",
              "test_engine_start.py", "test_engine_tp.py", "test_serve.py"]
collect_ignore = [] if HAVE_VLLM else NEEDS_VLLM

ENGINE_ARGS = dict(
    dtype="float32",
    kv_cache_memory_bytes=640 << 20,  # ~14k tokens of SmolLM2's cache
    max_model_len=4096,
    max_num_batched_tokens=512,       # chunked prefill in 512-token chunks
    enable_chunked_prefill=True,
    enable_prefix_caching=True,
    enforce_eager=True,
    seed=0,
)


@pytest.fixture(scope="session")
def checkpoint() -> str:
    from _model import smollm2_checkpoint

    return str(smollm2_checkpoint())


@contextlib.contextmanager
def engine(checkpoint: str, env: dict[str, str] | None = None, **kwargs) -> Iterator[object]:
    """An ``LLM`` with ``env`` set while it runs (the XAttention settings); torn down after."""
    env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "TRITON_INTERPRET": "0", **(env or {})}
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    llm = None
    try:
        from vllm import LLM

        if not on_cpu():
            # A share of the card that fits beside other work on it; the cache is sized above.
            kwargs.setdefault("gpu_memory_utilization", 0.15)
        llm = LLM(model=checkpoint, **{**ENGINE_ARGS, **kwargs})
        yield llm
    finally:
        del llm
        gc.collect()
        if HAVE_VLLM:
            from vllm.distributed import cleanup_dist_env_and_memory

            cleanup_dist_env_and_memory()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def greedy(max_tokens: int):
    from vllm import SamplingParams

    return SamplingParams(max_tokens=max_tokens, temperature=0.0)


@pytest.fixture(scope="session")
def tokenizer(checkpoint):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(checkpoint)


def on_cpu() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def stock_backend() -> dict:
    """The engine argument choosing the stock backend ours derives from: the CPU engine has one;
    on CUDA it is TRITON_ATTN (``cuda.py``), whose decode kernel and cache writer ours keeps, so
    threshold 1 must reproduce its tokens exactly (FLASH_ATTN, the CUDA default, has other
    rounding)."""
    return {} if on_cpu() else {"attention_backend": "TRITON_ATTN"}


@pytest.fixture(scope="session")
def stock(checkpoint, tokenizer) -> dict:
    """Everything the XAttention engines are compared with, from vLLM's stock backend."""
    from _workloads import equality_workload, needle_answer

    with engine(checkpoint, **stock_backend()) as llm:
        return {"equal": equality_workload(llm, tokenizer),
                "needle": needle_answer(llm, tokenizer)}
