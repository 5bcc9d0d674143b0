"""Reading an attention mask as key padding: which keys each sequence of the batch may see.

Video transformers pass either no mask or a key-padding mask (HunyuanVideo: ``[B, 1, 1, N]``
bool, the padded tail of the text prompt hidden). Such a mask is honoured exactly by leaving the
hidden keys out (docs/video.md). A mask that differs between query rows or heads, or that adds a
finite bias, is not key padding: :func:`key_padding` returns None and the call stays dense.
"""

from __future__ import annotations

import torch


def _as_visible(mask: torch.Tensor) -> torch.Tensor | None:
    """Bool "visible" tensor of a bool or additive float mask, None for a finite bias."""
    if mask.dtype == torch.bool:
        return mask
    if not mask.is_floating_point():
        return None
    # Additive masks: 0 where visible, -inf (or the dtype's most negative value) where hidden.
    hidden = mask <= torch.finfo(mask.dtype).min / 2
    if not bool(((mask == 0) | hidden).all()):
        return None
    return ~hidden


def key_padding(mask: torch.Tensor | None, batch: int, q_len: int, k_len: int
                ) -> torch.Tensor | None | bool:
    """``[B, Lk]`` bool of visible keys, True when there is no mask, None when ``mask`` is not a
    key-padding mask (rows or heads differ, a finite bias, an unexpected shape)."""
    if mask is None:
        return True
    visible = _as_visible(mask)
    if visible is None:
        return None
    if visible.dim() < 4:  # SDPA broadcasting: the missing dimensions are the leading ones
        visible = visible.reshape((1,) * (4 - visible.dim()) + tuple(visible.shape))
    if visible.dim() != 4 or visible.shape[-1] != k_len or visible.shape[0] not in (1, batch) \
            or visible.shape[2] not in (1, q_len):
        return None
    first = visible[:, :1, :1, :]
    if not torch.equal(visible, first.expand_as(visible)):
        return None
    return first[:, 0, 0, :].expand(batch, k_len)
