"""FlashAttention-4 (``flash-attn-4``, CuTe DSL) as an optional backend for the sparse stage.

Installed from a clone with ``pip install -e ".[fa4]"``; used by ``backend="auto"`` on Hopper
(sm90) and Blackwell (sm100) where it can serve the inputs, the Triton kernel otherwise.
FA4 takes block
sparsity as two lists per (batch, head, query block): *full* key blocks, computed without any
element mask, and *mask* blocks, where it applies the causal mask (with queries aligned to the end
of the keys, as here) and the key-length bound. Kept blocks wholly visible to every row of their
query block go to the first list; the diagonal band and the ragged last key block to the second.
K/V keep their KV-head count: FA4 maps query heads to KV heads itself (GQA without repeating).
See docs/design.md for how the backends are chosen.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

# sm90 FA4 needs the sparse key block to equal its key tile: 128 for these head dims.
_FA4_HEAD_DIMS = (64, 96, 128)
_FA4_BLOCK = 128


@functools.cache
def fa4_import_error() -> str | None:
    """None when FA4 can be imported, else why not."""
    try:
        from flash_attn.cute import flash_attn_func  # noqa: F401
        from flash_attn.cute.block_sparsity import BlockSparseTensorsTorch  # noqa: F401
    except Exception as exc:  # ImportError, or the CuTe DSL failing to load
        return f"{type(exc).__name__}: {exc}"
    return None


def fa4_unsupported_reason(q: torch.Tensor, k: torch.Tensor, block_size: int) -> str | None:
    """None when FA4 can run this sparse attention, else the reason (checked cheaply first)."""
    if q.device.type != "cuda":
        return f"tensors are on {q.device.type}"
    if q.dtype not in (torch.float16, torch.bfloat16):
        return f"dtype {q.dtype} (FA4 takes float16, bfloat16)"
    if q.shape[-1] not in _FA4_HEAD_DIMS or k.shape[-1] != q.shape[-1]:
        return f"head_dim {q.shape[-1]} (this backend serves {_FA4_HEAD_DIMS})"
    if block_size != _FA4_BLOCK:
        return f"block_size {block_size} (FA4's key tile is {_FA4_BLOCK})"
    major = torch.cuda.get_device_capability(q.device)[0]
    if major not in (9, 10):
        return f"compute capability {major}.x (FA4 block sparsity runs on sm90 and sm100)"
    return fa4_import_error()


@triton.jit
def _fa4_block_lists_kernel(
    Mask, FullIdx, FullCnt, MaskIdx, MaskCnt,
    stride_mb, stride_mh, stride_mi,
    num_heads, num_q_blocks, num_k_blocks, q_len, k_len,
    BLOCK_SIZE: tl.constexpr, CAUSAL: tl.constexpr, NKB_PAD: tl.constexpr,
):
    pid = tl.program_id(0)  # one (batch, head, query block) row
    i = pid % num_q_blocks
    h = (pid // num_q_blocks) % num_heads
    b = pid // (num_q_blocks * num_heads)
    j = tl.arange(0, NKB_PAD)
    in_row = j < num_k_blocks
    keep = tl.load(Mask + b * stride_mb + h * stride_mh + i * stride_mi + j, mask=in_row,
                   other=0) != 0
    # Wholly visible: inside the keys and, if causal, at or before the block's first row.
    safe = (j + 1) * BLOCK_SIZE <= k_len
    if CAUSAL:
        safe = safe & ((j + 1) * BLOCK_SIZE - 1 <= k_len - q_len + i * BLOCK_SIZE)
    full = (keep & safe).to(tl.int32)
    part = (keep & ~safe).to(tl.int32)
    tl.store(FullIdx + pid * num_k_blocks + tl.cumsum(full, 0) - full, j, mask=full != 0)
    tl.store(MaskIdx + pid * num_k_blocks + tl.cumsum(part, 0) - part, j, mask=part != 0)
    tl.store(FullCnt + pid, tl.sum(full, 0))
    tl.store(MaskCnt + pid, tl.sum(part, 0))


def fa4_block_lists(mask: torch.Tensor, q_len: int, k_len: int, block_size: int, causal: bool):
    """FA4's ``BlockSparseTensorsTorch`` for a bool block mask ``[B, H, nQB, nKB]``."""
    from flash_attn.cute.block_sparsity import BlockSparseTensorsTorch

    b, h, nqb, nkb = mask.shape
    as_bytes = mask.view(torch.int8) if mask.dtype == torch.bool else mask
    if as_bytes.stride(-1) != 1:
        as_bytes = as_bytes.contiguous()
    # Entries past each count are never read, but must be valid block indices for FA4's loads.
    full_idx = torch.zeros(b, h, nqb, nkb, dtype=torch.int32, device=mask.device)
    mask_idx = torch.zeros(b, h, nqb, nkb, dtype=torch.int32, device=mask.device)
    full_cnt = torch.empty(b, h, nqb, dtype=torch.int32, device=mask.device)
    mask_cnt = torch.empty(b, h, nqb, dtype=torch.int32, device=mask.device)
    nkb_pad = max(16, triton.next_power_of_2(nkb))
    _fa4_block_lists_kernel[(b * h * nqb,)](
        as_bytes, full_idx, full_cnt, mask_idx, mask_cnt,
        as_bytes.stride(0), as_bytes.stride(1), as_bytes.stride(2),
        h, nqb, nkb, q_len, k_len,
        BLOCK_SIZE=block_size, CAUSAL=bool(causal), NKB_PAD=nkb_pad,
        num_warps=4 if nkb_pad <= 2048 else 8,
    )
    return BlockSparseTensorsTorch(mask_block_cnt=mask_cnt, mask_block_idx=mask_idx,
                                   full_block_cnt=full_cnt, full_block_idx=full_idx,
                                   block_size=(block_size, block_size))


def block_sparse_attention_fa4(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor,
    block_size: int,
    causal: bool,
    scale: float,
    block_lists=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """FA4 forward on ``[B, H, L, D]`` tensors (viewed as FA4's ``[B, L, H, D]``, no copy).

    Returns ``(out [B, Hq, Lq, D], lse float32 [B, Hq, Lq])``; ``out`` is a transposed view of
    FA4's ``[B, Lq, Hq, D]`` output.
    """
    from flash_attn.cute import flash_attn_func

    lq, lk = q.shape[2], k.shape[2]
    if block_lists is None:
        block_lists = fa4_block_lists(mask, lq, lk, block_size, causal)
    out, lse = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                               softmax_scale=scale, causal=bool(causal),
                               block_sparse_tensors=block_lists, return_lse=True)
    return out.transpose(1, 2), lse
