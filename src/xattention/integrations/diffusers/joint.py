"""Joint text-video attention with XAttention over the video x video region only.

A sequence of ``N`` tokens holds one contiguous span of video tokens ``[v0, v1)``; every other
token is text (before the span, after it, or none). The rule (docs/video.md, "Joint attention"):

* video rows x video columns: XAttention (antidiagonal estimate, block selection, block-sparse
  attention), non-causal;
* video rows x text columns: always kept, dense;
* text rows (valid or padding) x every valid column: always kept, dense;
* key padding (an attention mask that hides some text keys) is honoured exactly: hidden keys are
  left out of every softmax, as SDPA with the mask does.

The parts are computed separately, each with its log-sum-exp, and merged exactly, so a threshold
``>= 1`` reproduces dense attention up to rounding. Nothing of size ``N x N`` is allocated: the
dense pieces against text keys work in row chunks, the text rows against the video keys go through
the block-sparse kernel with every block kept.
"""

from __future__ import annotations

import torch

from ...api import xattention
from ...merge import merge_attention
from ...sparse_attention import block_sparse_attention

# Float32 logits held at once by the dense pieces against text keys (~256 MiB).
_CHUNK_ELEMENTS = 1 << 26


def _repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def dense_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense non-causal attention of ``q [B, Hq, Lq, D]`` over ``k, v [B, Hkv, Lk, D]`` in row
    chunks; returns float32 ``out [B, Hq, Lq, D]`` and natural-log ``lse [B, Hq, Lq]``.

    Any ``Lq`` and ``Lk`` (the block-sparse kernel wants ``Lq <= Lk``; video rows against a few
    hundred text keys are the other way round).
    """
    b, hq, lq, d = q.shape
    groups = hq // k.shape[1]
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    kf = _repeat_kv(k, groups).to(work)
    vf = _repeat_kv(v, groups).to(work)
    out = torch.empty(b, hq, lq, d, dtype=work, device=q.device)
    lse = torch.empty(b, hq, lq, dtype=work, device=q.device)
    step = max(1, _CHUNK_ELEMENTS // max(1, b * hq * k.shape[2]))
    for r0 in range(0, lq, step):
        r1 = min(lq, r0 + step)
        logits = torch.matmul(q[:, :, r0:r1].to(work), kf.transpose(-1, -2)) * scale
        m = logits.amax(-1, keepdim=True)
        p = torch.exp(logits - m)
        s = p.sum(-1, keepdim=True)
        out[:, :, r0:r1] = torch.matmul(p, vf) / s
        lse[:, :, r0:r1] = (m + torch.log(s)).squeeze(-1)
    return out, lse


def merge(parts: list[tuple[torch.Tensor, torch.Tensor]], dtype: torch.dtype) -> torch.Tensor:
    """Combine attention over disjoint key sets from their ``(out, lse)``: the core's exact
    softmax merge (:func:`xattention.merge.merge_attention`), which keeps the non-finite rules."""
    return merge_attention(parts, dtype)


def video_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                    threshold: float | torch.Tensor, stride: int, block_size: int, scale: float,
                    backend: str, need_lse: bool, estimate_dtype: torch.dtype | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """XAttention of video rows over video keys (non-causal); ``(out, lse or None, mask)``.

    One ``xattention()`` call either way (validated once, the non-finite rules of
    docs/design.md §4 applied), with the log-sum-exp kept for the merge when asked.
    """
    res = xattention(q, k, v, threshold=threshold, stride=stride, block_size=block_size,
                     causal=False, scale=scale, backend=backend, return_mask=True,
                     return_lse=need_lse, estimate_dtype=estimate_dtype)
    if need_lse:
        return res
    out, mask = res
    return out, None, mask


def _rows_over_video(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                     block_size: int, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense attention of a few (text) rows over all video keys, with the log-sum-exp."""
    if q.shape[2] > k.shape[2]:
        return dense_with_lse(q, k, v, scale)
    nqb, nkb = -(-q.shape[2] // block_size), -(-k.shape[2] // block_size)
    full = torch.ones(1, 1, nqb, nkb, dtype=torch.bool, device=q.device)
    return block_sparse_attention(q, k, v, full, block_size=block_size, causal=False,
                                  scale=scale, backend=backend, return_lse=True)


def joint_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, video: tuple[int, int],
                    text_keys: torch.Tensor | None, threshold: float | torch.Tensor, stride: int,
                    block_size: int, scale: float, backend: str,
                    estimate_dtype: torch.dtype | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of one sequence (batch of sequences with the same valid text keys).

    Args:
        q, k, v: ``[B, H, N, D]`` (``k, v`` may have fewer heads: GQA).
        video: ``(v0, v1)``, the span of video tokens; every other token is text.
        text_keys: long indices of the text keys every row may see (the valid ones), or None for
            all tokens outside the video span.
        threshold, stride, block_size, scale, backend, estimate_dtype: as for
            :func:`xattention.xattention`.

    Returns:
        ``out [B, H, N, D]`` in q's dtype and the video block mask ``[B, H, nB, nB]``.
    """
    n = q.shape[2]
    v0, v1 = video
    if text_keys is None:
        text_keys = torch.cat([torch.arange(0, v0, device=q.device),
                               torch.arange(v1, n, device=q.device)])
    kv_video = (k[:, :, v0:v1], v[:, :, v0:v1])
    has_text_keys = text_keys.numel() > 0
    out_v, lse_v, mask = video_attention(q[:, :, v0:v1], *kv_video, threshold=threshold,
                                         stride=stride, block_size=block_size, scale=scale,
                                         backend=backend, need_lse=has_text_keys,
                                         estimate_dtype=estimate_dtype)
    if v0 == 0 and v1 == n and not has_text_keys:
        return out_v, mask
    out = torch.empty_like(q)
    kt = k.index_select(2, text_keys) if has_text_keys else None
    vt = v.index_select(2, text_keys) if has_text_keys else None
    if has_text_keys:
        out[:, :, v0:v1] = merge([(out_v, lse_v), dense_with_lse(q[:, :, v0:v1], kt, vt, scale)],
                                 q.dtype)
    else:
        out[:, :, v0:v1] = out_v
    for r0, r1 in ((0, v0), (v1, n)):
        if r1 <= r0:
            continue
        rows = q[:, :, r0:r1]
        parts = [_rows_over_video(rows, *kv_video, scale, block_size, backend)]
        if has_text_keys:
            parts.append(dense_with_lse(rows, kt, vt, scale))
        out[:, :, r0:r1] = merge(parts, q.dtype)
    return out, mask
