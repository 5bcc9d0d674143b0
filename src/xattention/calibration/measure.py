"""Measuring how density, recall and output error move with the threshold, per head.

For one layer's post-RoPE ``q [B, Hq, Lq, D]``, ``k, v [B, Hkv, Lk, D]`` and a grid of thresholds
``t_1 > t_2 > ...``:

* the antidiagonal estimate and the selection run exactly as at inference
  (``estimate_block_scores`` + ``select_blocks`` for every grid threshold), giving one block mask
  per threshold;
* exact attention gives the truth. Query blocks are processed one at a time (memory
  ``O(Hq * Bs * Lk)``, never ``Lq x Lk`` for all heads): for each query row the softmax mass
  in every key block, ``m[r, j]``, and the per-block partial outputs ``o[r, j] = sum_{c in j}
  p[r, c] v[c]`` (same FLOPs as dense attention);
* for every threshold's mask ``M``: the row's *recall* ``sum_j M[j] m[r, j]`` (the true attention
  mass the sparse attention keeps), and the sparse output, which is exactly the renormalised
  kept part, ``sum_j M[j] o[r, j] / recall``; its squared distance to the dense output
  ``sum_j o[r, j]`` is the *output error*.

Per head and threshold we accumulate: kept and candidate blocks (density = kept / candidates,
candidates being the key blocks a causal query block can see), the summed row recall, and the
summed squared output error and output energy (relative error = their ratio). Sums accumulate
over layers' texts, so curves average over any number of calibration windows.

``rows=(r0, r1)`` restricts recall and output error to those query rows (density still counts the
whole layer: it is what the sparse attention costs everywhere). Retrieval calibration uses it to
score only the rows that predict the answer, where a lost needle shows; only the query blocks
that hold those rows get the exact-attention pass, so a long window costs little more than its
estimate.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..block_layout import candidate_blocks, num_blocks
from ..estimate import estimate_block_scores
from ..selection import select_blocks


@dataclass
class CurveSums:
    """Running sums for one layer: arrays ``[Hq, T]`` (T = grid size) plus scalars.

    Attributes:
        kept: kept candidate blocks.
        candidates: candidate blocks (same for every threshold).
        recall_sum: summed per-row recall.
        rows: number of query rows summed.
        err_sum: summed squared output error (over rows and head dims).
        out_energy: summed squared dense output, ``[Hq]``.
        min_row_recall: smallest row recall seen.
    """

    kept: np.ndarray
    candidates: np.ndarray
    recall_sum: np.ndarray
    rows: np.ndarray
    err_sum: np.ndarray
    out_energy: np.ndarray
    min_row_recall: np.ndarray

    @classmethod
    def zeros(cls, heads: int, grid: int) -> CurveSums:
        z = np.zeros((heads, grid))
        return cls(z.copy(), np.zeros(heads), z.copy(), np.zeros(heads), z.copy(),
                   np.zeros(heads), np.ones((heads, grid)))

    def add(self, other: CurveSums) -> None:
        self.kept += other.kept
        self.candidates += other.candidates
        self.recall_sum += other.recall_sum
        self.rows += other.rows
        self.err_sum += other.err_sum
        self.out_energy += other.out_energy
        self.min_row_recall = np.minimum(self.min_row_recall, other.min_row_recall)

    @property
    def density(self) -> np.ndarray:
        """Kept / candidate blocks, ``[Hq, T]``."""
        return self.kept / np.maximum(self.candidates, 1)[:, None]

    @property
    def recall(self) -> np.ndarray:
        """Mean row recall of the true attention mass, ``[Hq, T]``."""
        return self.recall_sum / np.maximum(self.rows, 1)[:, None]

    @property
    def rel_error(self) -> np.ndarray:
        """Relative squared output error ``sum |o_sparse - o|^2 / sum |o|^2``, ``[Hq, T]``."""
        return self.err_sum / np.maximum(self.out_energy, 1e-30)[:, None]


def _expand_kv(x: torch.Tensor, hq: int) -> torch.Tensor:
    hkv = x.shape[1]
    return x if hkv == hq else x.repeat_interleave(hq // hkv, dim=1)


@torch.no_grad()
def masks_for_grid(
    scores: torch.Tensor,
    grid: Sequence[float],
    q_len: int,
    k_len: int,
    block_size: int,
    causal: bool = True,
    backend: str = "auto",
) -> torch.Tensor:
    """Block masks for every grid threshold: bool ``[T, B, Hq, nQB, nKB]``.

    One ``select_blocks`` call: the scores are tiled ``T`` times along the head axis with a
    per-head threshold tensor, so the rows are sorted once for all thresholds.
    """
    b, h, nqb, nkb = scores.shape
    n_t = len(grid)
    tiled = scores.unsqueeze(1).expand(b, n_t, h, nqb, nkb).reshape(b, n_t * h, nqb, nkb)
    thr = torch.tensor([float(t) for t in grid], dtype=torch.float32).repeat_interleave(h)
    mask = select_blocks(tiled, thr.to(scores.device), q_len, k_len, block_size, causal,
                         backend=backend)
    return mask.view(b, n_t, h, nqb, nkb).transpose(0, 1)


@torch.no_grad()
def measure_layer(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    grid: Sequence[float],
    stride: int = 8,
    block_size: int = 128,
    causal: bool = True,
    scale: float | None = None,
    backend: str = "auto",
    compute_dtype: torch.dtype = torch.float32,
    rows: tuple[int, int] | None = None,
) -> CurveSums:
    """Density / recall / output-error sums of one layer for every threshold in ``grid``.

    Args:
        q: ``[B, Hq, Lq, D]`` post-RoPE queries (the last ``Lq`` positions).
        k, v: ``[B, Hkv, Lk, D]``.
        grid: thresholds to evaluate (any order; columns follow it).
        stride, block_size, causal, scale, backend: as for ``estimate_block_scores``.
        compute_dtype: dtype of the exact-attention pass (float32 by default).
        rows: ``(r0, r1)``, query rows (``0 <= r0 < r1 <= Lq``) whose recall and output error
            are summed; all rows when None.

    Returns:
        ``CurveSums`` with ``[Hq, len(grid)]`` arrays.
    """
    b, hq, lq, d = q.shape
    lk = k.shape[2]
    if scale is None:
        scale = d ** -0.5
    if rows is None:
        row_lo, row_hi = 0, lq
    elif (not isinstance(rows, (tuple, list)) or len(rows) != 2
          or any(isinstance(r, bool) or not isinstance(r, int) for r in rows)):
        raise TypeError(f"rows must be a pair of ints (r0, r1), got {rows!r}")
    else:
        row_lo, row_hi = rows
    if not 0 <= row_lo < row_hi <= lq:
        raise ValueError(f"rows must satisfy 0 <= r0 < r1 <= Lq={lq}, got {rows}")
    scores = estimate_block_scores(q, k, stride=stride, block_size=block_size, causal=causal,
                                   scale=scale, backend=backend)
    masks = masks_for_grid(scores, grid, lq, lk, block_size, causal, backend)  # [T,B,H,nQB,nKB]
    cand = candidate_blocks(lq, lk, block_size, causal, q.device)  # [nQB, nKB]
    n_t = len(grid)
    kept = (masks & cand).sum(dim=(1, 3, 4)).double()  # [T, H]
    sums = CurveSums.zeros(hq, n_t)
    sums.kept = kept.T.cpu().numpy()
    sums.candidates = np.full(hq, float(cand.sum().item() * b))

    qf = q.to(compute_dtype)
    kf = _expand_kv(k, hq).to(compute_dtype)
    vf = _expand_kv(v, hq).to(compute_dtype)
    nqb = num_blocks(lq, block_size)
    offset = lk - lq
    recall_sum = torch.zeros(n_t, hq, dtype=torch.float64)
    err_sum = torch.zeros(n_t, hq, dtype=torch.float64)
    energy = torch.zeros(hq, dtype=torch.float64)
    min_recall = torch.ones(n_t, hq, dtype=torch.float64)
    for i in range(nqb):
        # The block's rows that are measured; the mask is still the whole block's.
        r0, r1 = max(i * block_size, row_lo), min((i + 1) * block_size, lq, row_hi)
        if r0 >= r1:
            continue
        rows = r1 - r0
        # Keys this query block can see (causal: up to its last absolute position).
        k_end = min(lk, offset + r1) if causal else lk
        nkb_i = num_blocks(k_end, block_size)
        k_pad = nkb_i * block_size
        logits = torch.matmul(qf[:, :, r0:r1], kf[:, :, :k_end].transpose(-1, -2))
        logits.mul_(scale)
        if causal:
            # Only keys after the block's first row can be in some row's future.
            c0 = offset + r0 + 1
            if c0 < k_end:
                pos = torch.arange(r0, r1, device=q.device)[:, None] + offset
                col = torch.arange(c0, k_end, device=q.device)[None, :]
                logits[..., c0:].masked_fill_(col > pos, float("-inf"))
        p = torch.softmax(logits, dim=-1)
        del logits
        if k_pad > k_end:
            p = torch.nn.functional.pad(p, (0, k_pad - k_end))
            vv = torch.nn.functional.pad(vf[:, :, :k_end], (0, 0, 0, k_pad - k_end))
        else:
            vv = vf[:, :, :k_end]
        p = p.view(b, hq, rows, nkb_i, block_size)
        mass = p.sum(-1)  # [B,H,rows,nkb_i]
        # Partial outputs per key block: [B,H,nkb_i,rows,D] (batched over key blocks).
        out_blocks = torch.matmul(p.transpose(2, 3), vv.reshape(b, hq, nkb_i, block_size, d))
        del p
        dense = out_blocks.sum(2)  # [B,H,rows,D]
        m = masks[:, :, :, i, :nkb_i].to(compute_dtype)  # [T,B,H,nkb_i]
        rec = torch.einsum("bhrj,tbhj->tbhr", mass, m)  # [T,B,H,rows]
        # Kept part of the output for every threshold: [B,H,T,rows*D] = m [B,H,T,j] @ blocks.
        kept = torch.matmul(m.permute(1, 2, 0, 3), out_blocks.reshape(b, hq, nkb_i, rows * d))
        kept = kept.view(b, hq, n_t, rows, d).permute(2, 0, 1, 3, 4)  # [T,B,H,rows,D]
        sparse = kept / rec.clamp_min(1e-30).unsqueeze(-1)
        err = (sparse - dense.unsqueeze(0)).square_().sum(-1)  # [T,B,H,rows]
        recall_sum += rec.sum(dim=(1, 3)).double().cpu()
        err_sum += err.sum(dim=(1, 3)).double().cpu()
        energy += dense.square().sum(dim=(0, 2, 3)).double().cpu()
        min_recall = torch.minimum(min_recall, rec.amin(dim=(1, 3)).double().cpu())
    sums.recall_sum = recall_sum.T.numpy()
    sums.rows = np.full(hq, float((row_hi - row_lo) * b))
    sums.err_sum = err_sum.T.numpy()
    sums.out_energy = energy.numpy()
    sums.min_row_recall = min_recall.T.numpy()
    return sums


def density_counts(
    scores: torch.Tensor,
    thresholds: torch.Tensor | float,
    q_len: int,
    k_len: int,
    block_size: int,
    causal: bool = True,
    backend: str = "auto",
) -> tuple[np.ndarray, np.ndarray]:
    """Kept and candidate block counts per head for precomputed block scores."""
    mask = select_blocks(scores, thresholds, q_len, k_len, block_size, causal, backend=backend)
    cand = candidate_blocks(q_len, k_len, block_size, causal, scores.device)
    kept = (mask & cand).sum(dim=(0, 2, 3)).double().cpu().numpy()
    total = np.full(scores.shape[1], float(cand.sum().item() * scores.shape[0]))
    return kept, total
