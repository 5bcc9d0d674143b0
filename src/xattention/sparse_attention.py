"""Block-sparse attention: dense softmax attention restricted to the kept blocks (DESIGN.md §2).

Token pair ``(r, c)`` is visible iff its (query block, key block) pair is kept and, when causal,
``c <= k_len - q_len + r``. Rows that see no key at all (possible only with a user-made mask) get a
zero output and a log-sum-exp of ``-inf``, the FlashAttention convention.
"""

from __future__ import annotations

import torch

from ._backend import resolve_backend
from ._validation import check_backend, check_block_mask, check_block_size, check_qkv, check_scale
from .block_layout import num_blocks

# Elements of one chunk's [B, Hq, rows, Lk] logits in the PyTorch path (~256 MiB in fp32).
_CHUNK_ELEMENTS = 1 << 26


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor,
    block_size: int = 128,
    causal: bool = True,
    scale: float | None = None,
    backend: str = "auto",
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention that computes only the (query block, key block) pairs ``mask`` keeps.

    Args:
        q: ``[B, Hq, Lq, D]``; k, v: ``[B, Hkv, Lk, D]`` with ``Hq % Hkv == 0`` and ``Lq <= Lk``.
        mask: bool ``[B, Hq, ceil(Lq/Bs), ceil(Lk/Bs)]``; batch and head dims may be 1 to broadcast.
            Any mask works, not only one from ``select_blocks``.
        block_size: block edge ``Bs`` the mask is expressed in.
        causal: additionally hide keys after each query's absolute position.
        scale: softmax scale, ``1/sqrt(D)`` when None.
        backend: ``"auto"``, ``"triton"`` or ``"torch"``.
        return_lse: also return the float32 log-sum-exp ``[B, Hq, Lq]`` (natural log).

    Returns:
        ``[B, Hq, Lq, D]`` in the dtype of ``q`` (and the log-sum-exp when asked).

    The PyTorch path computes logits for chunks of query rows against all keys, masked; its peak
    extra memory is one chunk of ``~2^26`` float32 logits whatever the length.

    Example:
        >>> import torch
        >>> from xattention import block_sparse_attention
        >>> q = k = v = torch.randn(1, 2, 256, 64)
        >>> mask = torch.ones(1, 1, 2, 2, dtype=torch.bool)  # every block: dense causal attention
        >>> out = block_sparse_attention(q, k, v, mask, block_size=128)
        >>> ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        >>> bool(torch.allclose(out, ref, atol=1e-5))
        True
    """
    shape = check_qkv(q, k, v)
    block_size = check_block_size(block_size)
    mask = check_block_mask(mask, shape, block_size)
    scale = check_scale(scale, shape.head_dim)
    backend = check_backend(backend)
    return _sparse_attention(q, k, v, mask, block_size, bool(causal), scale, backend,
                             bool(return_lse))


def _sparse_attention(q, k, v, mask, block_size, causal, scale, backend, return_lse):
    """Dispatch on validated input (shared with ``xattention``)."""
    from .kernels import sparse_attention_unsupported_reason

    chosen = resolve_backend(
        backend, q.device, sparse_attention_unsupported_reason(q, block_size), "sparse attention"
    )
    if chosen == "triton" and backend == "auto" and q.is_cuda:
        from .kernels.fa4 import block_sparse_attention_fa4, fa4_unsupported_reason

        if fa4_unsupported_reason(q, k, block_size) is None:  # FA4 installed and able: faster
            out, lse = block_sparse_attention_fa4(q, k, v, mask, block_size, causal, scale)
            return (out, lse) if return_lse else out
    if chosen == "triton":
        from .kernels.sparse_attention import block_sparse_attention_triton

        out, lse = block_sparse_attention_triton(q, k, v, mask, block_size, causal, scale)
    else:
        out, lse = block_sparse_attention_torch(q, k, v, mask, block_size, causal, scale)
    return (out, lse) if return_lse else out


def block_sparse_attention_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor,
    block_size: int,
    causal: bool,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked PyTorch implementation; ``mask`` already expanded to ``[B, Hq, nQB, nKB]``."""
    b, hq, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    group = hq // hkv
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    kf = k.to(work).unsqueeze(2)  # [B, Hkv, 1, Lk, D]
    vf = v.to(work).unsqueeze(2)
    out = torch.empty_like(q)
    lse = torch.empty(b, hq, lq, dtype=torch.float32, device=q.device)
    key_pos = torch.arange(lk, device=q.device)
    key_block = key_pos // block_size

    nqb = num_blocks(lq, block_size)
    blocks_per_chunk = max(1, _CHUNK_ELEMENTS // max(b * hq * block_size * lk, 1))
    for i0 in range(0, nqb, blocks_per_chunk):
        i1 = min(nqb, i0 + blocks_per_chunk)
        r0, r1 = i0 * block_size, min(lq, i1 * block_size)
        rows = torch.arange(r0, r1, device=q.device)
        qc = q[:, :, r0:r1].to(work).unflatten(1, (hkv, group))
        logits = torch.matmul(qc, kf.transpose(-1, -2)) * scale  # [B, Hkv, G, rows, Lk]
        visible = mask[:, :, (rows // block_size)][..., key_block]  # [B, Hq, rows, Lk]
        if causal:
            visible = visible & (key_pos[None, :] <= (rows + lk - lq)[:, None])
        logits.masked_fill_(~visible.unflatten(1, (hkv, group)), float("-inf"))
        row_max = logits.amax(-1, keepdim=True)
        seen = torch.isfinite(row_max)
        row_max = torch.where(seen, row_max, torch.zeros_like(row_max))
        p = torch.exp(logits - row_max)
        denom = p.sum(-1, keepdim=True)
        o = torch.matmul(p, vf) / torch.where(seen, denom, torch.ones_like(denom))
        out[:, :, r0:r1] = o.flatten(1, 2).to(q.dtype)
        lse_chunk = torch.where(seen, row_max + torch.log(denom), row_max.new_tensor(float("-inf")))
        lse[:, :, r0:r1] = lse_chunk.squeeze(-1).flatten(1, 2).to(torch.float32)
    return out, lse
