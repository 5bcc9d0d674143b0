"""``xattention()``: estimate, select, then block-sparse attention, in one call.

The call is split in two steps: :func:`check_call` validates everything once (the only place
that may read a tensor on the host: a per-head threshold tensor's range) and returns a
:class:`CallSpec`; :func:`run_call` runs the stages on validated input with no host sync and no
allocation whose size depends on data, so it can be captured in a CUDA graph
(``xattention.graphs``). A sparse call is three launches on the Triton path: the estimate (which
also writes the non-finite flags), the selection (which writes the :class:`SparsePlan`) and the
attention; the FP8 estimate adds its rounding (one Triton pass per operand plus the scales).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._backend import interpreter_enabled, runs_dense, warn_once
from ._validation import (
    AttentionShape,
    as_bhsd,
    check_backend,
    check_block_params,
    check_bool,
    check_estimate_dtype,
    check_min_sparse_len,
    check_paged_qkv,
    check_qkv,
    check_scale,
    check_threshold,
    from_bhsd,
)
from .block_layout import BlockLayout
from .estimate import _estimate_with_flags
from .kernels.dense import dense_attention, dense_block_mask
from .paged import PagedKV
from .plan import SparsePlan
from .selection import DEFAULT_THRESHOLD, _select_plan
from .sparse_attention import _sparse_attention


@dataclass(frozen=True)
class CallSpec:
    """A validated ``xattention()`` call: everything but the tensors' values."""

    shape: AttentionShape
    threshold: float | torch.Tensor
    stride: int
    block_size: int
    causal: bool
    scale: float
    backend: str
    min_sparse_len: int | None
    estimate_dtype: torch.dtype | None
    return_mask: bool
    return_lse: bool
    return_plan: bool
    bshd: bool

    @property
    def layout(self) -> BlockLayout:
        return BlockLayout(self.shape.q_len, self.shape.k_len, self.block_size, self.causal)


def xattention(
    q: torch.Tensor,
    k: torch.Tensor | PagedKV,
    v: torch.Tensor | None,
    threshold: float | torch.Tensor = DEFAULT_THRESHOLD,
    stride: int = 8,
    block_size: int = 128,
    causal: bool = True,
    scale: float | None = None,
    backend: str = "auto",
    return_mask: bool = False,
    min_sparse_len: int | None = None,
    estimate_dtype: torch.dtype | None = None,
    return_lse: bool = False,
    layout: str = "bhsd",
    return_plan: bool = False,
) -> torch.Tensor | tuple:
    """XAttention: attention over the blocks that antidiagonal scoring says matter.

    Args:
        q: ``[B, Hq, Lq, D]`` queries, the last ``Lq`` positions of the context (``Lq < Lk`` is
            chunked prefill against a KV cache).
        k, v: ``[B, Hkv, Lk, D]``; ``Hq % Hkv == 0`` (GQA: pass K/V unrepeated). Or ``k`` a
            :class:`~xattention.paged.PagedKV` (a paged cache and its block table) and ``v``
            None: the Triton kernels then read K/V in place through the table.
        threshold: fraction of estimated attention mass each query block keeps; a real number
            in ``(0, inf)`` (NumPy scalars too, not bool) or a tensor ``[Hq]``. ``>= 1`` keeps
            every block (dense attention).
        stride: antidiagonal stride ``S`` of the estimate; divides ``block_size``.
        block_size: block edge of the sparsity pattern.
        causal: causal attention, queries aligned to the end of the keys.
        scale: softmax scale, ``1/sqrt(D)`` when None.
        backend: ``"auto"`` (Triton on CUDA, PyTorch elsewhere), ``"triton"`` or ``"torch"``.
        return_mask: also return the bool block mask ``[B, Hq, ceil(Lq/Bs), ceil(Lk/Bs)]``
            (built from the plan on request).
        min_sparse_len: short inputs run exact dense attention instead, since the estimate and
            launches cost more than sparsity saves there. None (default): automatic, with
            ``backend="auto"`` on CUDA only, below a dense-FLOP crossover measured on the H200
            (docs/design.md); an int: dense when ``Lk < min_sparse_len`` (0: always sparse).
            A dense call's mask keeps every candidate block.
        estimate_dtype: None (the estimate multiplies in the input dtype) or
            ``torch.float8_e4m3fn``: the estimate's operands rounded to FP8, about 1.5x faster on
            Hopper at long lengths, at the cost of a different kept set on some rows
            (``estimate_block_scores`` has the details). Attention itself stays exact.
        return_lse: also return the float32 log-sum-exp of every query row (natural log,
            ``[B, Hq, Lq]``, ``[B, Lq, Hq]`` for ``"bshd"``), for merging with attention over
            other keys (:func:`xattention.merge.merge_attention`).
        layout: ``"bhsd"`` (default) or ``"bshd"``: ``[B, L, H, D]`` as FlashAttention takes it,
            read in place through strides; the output comes back in the same layout.
        return_plan: also return the :class:`~xattention.plan.SparsePlan` the call ran.

    Returns:
        the attention output in q's layout and dtype; with any ``return_*``, a tuple
        ``(out, lse?, mask?, plan?)`` holding the ones asked for, in that order.

    Example:
        >>> import torch
        >>> from xattention import xattention, block_density
        >>> q, k, v = (torch.randn(1, 4, 1024, 64) for _ in range(3))
        >>> out, mask = xattention(q, k, v, threshold=0.9, block_size=128, return_mask=True)
        >>> out.shape
        torch.Size([1, 4, 1024, 64])
        >>> 0 < block_density(mask, 1024, 1024, block_size=128)["overall"] <= 1
        True
    """
    q, k, v, spec = check_call(q, k, v, threshold=threshold, stride=stride,
                               block_size=block_size, causal=causal, scale=scale,
                               backend=backend, return_mask=return_mask,
                               min_sparse_len=min_sparse_len, estimate_dtype=estimate_dtype,
                               return_lse=return_lse, layout=layout, return_plan=return_plan)
    return from_bhsd(run_call(q, k, v, spec), spec.bshd)


def check_call(q: object, k: object, v: object, *, threshold: object = DEFAULT_THRESHOLD,
               stride: object = 8, block_size: object = 128, causal: object = True,
               scale: object = None, backend: object = "auto", return_mask: object = False,
               min_sparse_len: object = None, estimate_dtype: object = None,
               return_lse: object = False, layout: object = "bhsd", return_plan: object = False
               ) -> tuple[torch.Tensor, torch.Tensor | PagedKV, torch.Tensor | None, CallSpec]:
    """Validate an ``xattention()`` call once: ``(q, k, v as [B, H, L, D] views, spec)``."""
    q, k, v, bshd = as_bhsd(layout, q, k, v)
    if isinstance(k, PagedKV):
        shape = check_paged_qkv(q, k, v)
    else:
        shape = check_qkv(q, k, v, layout="bshd" if bshd else "bhsd", need_v=True)
    stride, block_size = check_block_params(stride, block_size)
    spec = CallSpec(
        shape=shape,
        threshold=check_threshold(threshold, shape.q_heads, shape.device),
        stride=stride,
        block_size=block_size,
        causal=check_bool("causal", causal),
        scale=check_scale(scale, shape.head_dim),
        backend=check_backend(backend),
        min_sparse_len=check_min_sparse_len(min_sparse_len),
        estimate_dtype=check_estimate_dtype(estimate_dtype),
        return_mask=check_bool("return_mask", return_mask),
        return_lse=check_bool("return_lse", return_lse),
        return_plan=check_bool("return_plan", return_plan),
        bshd=bshd,
    )
    return q, k, v, spec


def run_call(q: torch.Tensor, k: torch.Tensor | PagedKV, v: torch.Tensor | None, spec: CallSpec,
             out: torch.Tensor | None = None) -> torch.Tensor | tuple:
    """Run a validated call on ``[B, H, L, D]`` tensors (no host sync, nothing sized by data).

    ``out``: a ``[B, Hq, Lq, D]`` buffer for the output (a captured graph's), else a new one.
    """
    shape, lay = spec.shape, spec.layout
    if isinstance(k, PagedKV):
        reason = _paged_gather_reason(q, k, spec)
        if reason is not None:
            if q.is_cuda:
                warn_once(f"xattention: the paged K/V is copied out of its pages ({reason})")
            k, v = k.gather()
    if shape.batch == 0:  # like SDPA: an empty batch gives an empty output
        return _results(spec, q.new_empty(q.shape[:3] + k.shape[3:]),
                        q.new_empty(q.shape[:3], dtype=torch.float32),
                        SparsePlan.empty(lay, 0, shape.q_heads, q.device))
    if runs_dense(q, k, spec.causal, spec.backend, spec.min_sparse_len):
        if isinstance(k, PagedKV):  # short: SDPA on a copy costs less than the sparse calls
            k, v = k.gather()
        if not (spec.return_lse or spec.return_plan):
            res = dense_attention(q, k, v, spec.causal, spec.scale)
            if out is not None:
                res = out.copy_(res)
            if not spec.return_mask:
                return res
            return res, dense_block_mask(shape.batch, shape.q_heads, shape.q_len, shape.k_len,
                                         spec.block_size, spec.causal, q.device)
        # SDPA gives no log-sum-exp: the sparse stage over every candidate block does.
        full = lay.candidate(q.device).expand(shape.batch, shape.q_heads, -1, -1)
        plan = SparsePlan.from_mask(full, lay)
    else:
        # A PagedKV stands for both K and V (the estimate's non-finite flags read both).
        kv_v = k if isinstance(k, PagedKV) else v
        scores, flags = _estimate_with_flags(q, k, kv_v, spec.stride, spec.block_size,
                                             spec.causal, spec.scale, spec.backend,
                                             spec.estimate_dtype)
        plan = _select_plan(scores, spec.threshold, lay, spec.backend, inputs=(q, k, v),
                            flags=flags)
    got = _sparse_attention(q, k, v, plan, spec.block_size, spec.causal, spec.scale,
                            spec.backend, spec.return_lse, out=out)
    res, lse = got if spec.return_lse else (got, None)
    return _results(spec, res, lse, plan)


def _paged_gather_reason(q: torch.Tensor, kv: PagedKV, spec: CallSpec) -> str | None:
    """Why this call cannot read ``kv`` in place (it then runs on a gathered copy), or None.

    Only the Triton estimate and sparse kernels read pages; the PyTorch path (CPU tensors,
    ``backend="torch"``) and the FP8 estimate's rounding take contiguous K/V.
    """
    from .kernels import estimate_unsupported_reason, sparse_attention_unsupported_reason

    if spec.backend == "torch":
        return "backend='torch'"
    if not (q.is_cuda or interpreter_enabled()):
        return "the PyTorch path (CPU tensors)"
    if spec.estimate_dtype is not None:
        return "the FP8 estimate rounds a contiguous copy of k"
    if kv.k_pages.stride(-1) != 1 or kv.v_pages.stride(-1) != 1:
        return "the pages' head dim is not contiguous"
    return (estimate_unsupported_reason(q, kv, spec.stride, spec.block_size)
            or sparse_attention_unsupported_reason(q, spec.block_size))


def _results(spec: CallSpec, out, lse, plan: SparsePlan):
    extra = []
    if spec.return_lse:
        extra.append(lse)
    if spec.return_mask:
        extra.append(plan.to_dense())
    if spec.return_plan:
        extra.append(plan)
    return (out, *extra) if extra else out
