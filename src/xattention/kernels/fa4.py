"""FlashAttention-4 (``flash-attn-4``, CuTe DSL) as an optional backend for the sparse stage.

Installed from a clone with ``pip install -e ".[fa4]"``; used by ``backend="auto"`` on Hopper
(sm90) and Blackwell (sm100) where it can serve the inputs, the Triton kernel otherwise.
FA4 takes block
sparsity as two lists per (batch, head, query block): *full* key blocks, computed without any
element mask, and *mask* blocks, where it applies the causal mask (with queries aligned to the end
of the keys, as here) and the key-length bound. Kept blocks wholly visible to every row of their
query block go to the first list; the diagonal band and the ragged last key block to the second:
exactly the full and partial lists of a :class:`~xattention.plan.SparsePlan`, passed as they are.
K/V keep their KV-head count: FA4 maps query heads to KV heads itself (GQA without repeating).
See docs/design.md for how the backends are chosen.
"""

from __future__ import annotations

import functools

import torch

from ..plan import SparsePlan

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


def fa4_block_lists(plan: SparsePlan):
    """FA4's ``BlockSparseTensorsTorch`` for a plan: the same tensors, no copy (FA4's *full* list
    is the plan's full list, its *mask* list the plan's partial list)."""
    from flash_attn.cute.block_sparsity import BlockSparseTensorsTorch

    bs = plan.layout.block_size
    return BlockSparseTensorsTorch(mask_block_cnt=plan.partial_count,
                                   mask_block_idx=plan.partial_index,
                                   full_block_cnt=plan.full_count,
                                   full_block_idx=plan.full_index, block_size=(bs, bs))


def block_sparse_attention_fa4(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plan: SparsePlan,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """FA4 forward on ``[B, H, L, D]`` tensors (viewed as FA4's ``[B, L, H, D]``, no copy).

    Returns ``(out [B, Hq, Lq, D], lse float32 [B, Hq, Lq])``; ``out`` is a transposed view of
    FA4's ``[B, Lq, Hq, D]`` output.
    """
    from flash_attn.cute import flash_attn_func

    # FA4 indexes the lists per (batch, head) itself: broadcast plans must be materialised.
    plan = plan.contiguous()
    out, lse = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                               softmax_scale=scale, causal=bool(plan.layout.causal),
                               block_sparse_tensors=fa4_block_lists(plan), return_lse=True)
    return out.transpose(1, 2), lse
