"""Float64 brute-force reference for docs/design.md §2.

Written from the spec only, deliberately simple and slow: explicit loops over the
antidiagonal offset ``t``, explicit causal allowedness per (query group, key group),
a plain Python loop per selection row, and a token-level boolean mask for attention.
Use it on small sizes only.

Conventions (docs/design.md §2):
  q [B, Hq, Lq, D], k/v [B, Hkv, Lk, D], query head h uses key head h // (Hq // Hkv),
  query row r sits at absolute position p(r) = Lk - Lq + r.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "cdiv",
    "ref_block_scores",
    "ref_antidiagonal_logits",
    "ref_group_allowed",
    "ref_candidates",
    "ref_forced",
    "ref_select",
    "ref_select_row",
    "robust_rows",
    "ref_token_mask",
    "ref_sparse_attention",
    "ref_dense_attention",
    "ref_density",
]


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _pos(r: int, q_len: int, k_len: int) -> int:
    """Absolute position of query row r."""
    return k_len - q_len + r


def _kv_index(hq: int, hkv: int) -> list[int]:
    group = hq // hkv
    return [h // group for h in range(hq)]


# --------------------------------------------------------------------------------------
# Antidiagonal estimate
# --------------------------------------------------------------------------------------


def ref_antidiagonal_logits(q, k, stride, scale=None):
    """A(a, b) = scale / S * sum_t q[a*S + (S-1-t)] . k[b*S + t], zero-padded to whole groups.

    Returns float64 [B, Hq, nQG, nKG]. Computed with a loop over t and explicit index lists.
    """
    B, Hq, Lq, D = q.shape
    _, Hkv, Lk, _ = k.shape
    S = stride
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    n_qg, n_kg = cdiv(Lq, S), cdiv(Lk, S)
    q64 = torch.zeros(B, Hq, n_qg * S, D, dtype=torch.float64)
    q64[:, :, :Lq] = q.detach().cpu().to(torch.float64)
    k64 = torch.zeros(B, Hkv, n_kg * S, D, dtype=torch.float64)
    k64[:, :, :Lk] = k.detach().cpu().to(torch.float64)
    k64 = k64[:, _kv_index(Hq, Hkv)]  # GQA: repeat key heads

    A = torch.zeros(B, Hq, n_qg, n_kg, dtype=torch.float64)
    for t in range(S):
        q_rows = torch.tensor([a * S + (S - 1 - t) for a in range(n_qg)])
        k_rows = torch.tensor([b * S + t for b in range(n_kg)])
        A += q64[:, :, q_rows] @ k64[:, :, k_rows].transpose(-1, -2)
    return A * (float(scale) / S)


def ref_group_allowed(q_len, k_len, stride, causal):
    """allowed[a, b] per docs/design.md §2.3: padding-only key groups never;
    causal: b*S <= p(last row of a).

    The last row of a (possibly partial) last query group is taken as the last real row; using
    the padded row index instead changes nothing, since the extra key groups it would admit are
    padding-only.
    """
    S = stride
    n_qg, n_kg = cdiv(q_len, S), cdiv(k_len, S)
    allowed = torch.zeros(n_qg, n_kg, dtype=torch.bool)
    for a in range(n_qg):
        last_row = min(a * S + S - 1, q_len - 1)
        p_last = _pos(last_row, q_len, k_len)
        for b in range(n_kg):
            if b * S >= k_len:  # made only of padding
                continue
            if causal and not (b * S <= p_last):
                continue
            allowed[a, b] = True
    return allowed


def ref_block_scores(q, k, stride, block_size, causal=True, scale=None):
    """Row-normalised block scores, float64 [B, Hq, ceil(Lq/Bs), ceil(Lk/Bs)]."""
    B, Hq, Lq, D = q.shape
    Lk = k.shape[2]
    S, Bs = stride, block_size
    assert Bs % S == 0 and Hq % k.shape[1] == 0 and Lq <= Lk
    A = ref_antidiagonal_logits(q, k, S, scale)
    allowed = ref_group_allowed(Lq, Lk, S, causal)
    n_qg, n_kg = allowed.shape

    # softmax of A(a, .) over the allowed b only
    masked = A.masked_fill(~allowed, float("-inf"))
    row_max = masked.max(dim=-1, keepdim=True).values
    e = torch.exp(masked - row_max) * allowed
    P = e / e.sum(dim=-1, keepdim=True)

    g = Bs // S  # groups per block
    n_qb, n_kb = cdiv(Lq, Bs), cdiv(Lk, Bs)
    scores = torch.zeros(B, Hq, n_qb, n_kb, dtype=torch.float64)
    for i in range(n_qb):
        a0, a1 = i * g, min((i + 1) * g, n_qg)
        for j in range(n_kb):
            b0, b1 = j * g, min((j + 1) * g, n_kg)
            scores[:, :, i, j] = P[:, :, a0:a1, b0:b1].sum(dim=(-1, -2))
    return scores / scores.sum(dim=-1, keepdim=True)


# --------------------------------------------------------------------------------------
# Selection
# --------------------------------------------------------------------------------------


def _block_rows(i, q_len, block_size):
    return i * block_size, min((i + 1) * block_size, q_len) - 1  # first, last row


def ref_candidates(q_len, k_len, block_size, causal):
    """bool [nQB, nKB]: key blocks with at least one allowed key (causal) or all (non-causal)."""
    n_qb, n_kb = cdiv(q_len, block_size), cdiv(k_len, block_size)
    cand = torch.zeros(n_qb, n_kb, dtype=torch.bool)
    for i in range(n_qb):
        _, last = _block_rows(i, q_len, block_size)
        p_last = _pos(last, q_len, k_len)
        for j in range(n_kb):
            first_key = j * block_size
            cand[i, j] = (not causal) or first_key <= p_last
    return cand


def ref_forced(q_len, k_len, block_size, causal):
    """bool [nQB, nKB]: causal only: key block 0 and the key blocks holding p(r), r in block i."""
    n_qb, n_kb = cdiv(q_len, block_size), cdiv(k_len, block_size)
    forced = torch.zeros(n_qb, n_kb, dtype=torch.bool)
    if not causal:
        return forced
    for i in range(n_qb):
        first, last = _block_rows(i, q_len, block_size)
        forced[i, 0] = True
        for r in range(first, last + 1):
            forced[i, _pos(r, q_len, k_len) // block_size] = True
    return forced


def _thresholds(threshold, n_heads):
    if isinstance(threshold, torch.Tensor):
        t = threshold.detach().cpu().to(torch.float64).reshape(-1).tolist()
        if len(t) == 1:
            t = t * n_heads
        assert len(t) == n_heads
        return t
    return [float(threshold)] * n_heads


def ref_select_row(row, thr, cand, forced):
    """One row: list of floats ``row``, bool lists cand/forced -> list of kept bools."""
    n = len(row)
    keep = [bool(cand[j] and forced[j]) for j in range(n)]
    if thr >= 1.0:
        return [bool(cand[j]) for j in range(n)]
    total = sum(row[j] for j in range(n) if cand[j])
    cum = sum(row[j] for j in range(n) if keep[j])
    others = [j for j in range(n) if cand[j] and not forced[j]]
    others.sort(key=lambda j: (-row[j], j))  # descending score, ties: lower j first
    for j in others:
        if cum < thr * total:
            keep[j] = True
            cum += row[j]
        else:
            break
    return keep


def ref_select(scores, threshold, q_len, k_len, block_size, causal=True):
    """bool [B, Hq, nQB, nKB] following docs/design.md §2.4 literally (float64 sums)."""
    B, H, n_qb, n_kb = scores.shape
    assert (n_qb, n_kb) == (cdiv(q_len, block_size), cdiv(k_len, block_size))
    s = scores.detach().cpu().to(torch.float64)
    thr = _thresholds(threshold, H)
    cand = ref_candidates(q_len, k_len, block_size, causal).tolist()
    forced = ref_forced(q_len, k_len, block_size, causal).tolist()
    out = torch.zeros(B, H, n_qb, n_kb, dtype=torch.bool)
    for b in range(B):
        for h in range(H):
            for i in range(n_qb):
                keep = ref_select_row(s[b, h, i].tolist(), thr[h], cand[i], forced[i])
                out[b, h, i] = torch.tensor(keep, dtype=torch.bool)
    return out


def robust_rows(scores, threshold, q_len, k_len, block_size, causal=True, tol=1e-6):
    """bool [B, Hq, nQB]: rows whose selection cannot change if every score moves by <= tol.

    A row is fragile when a cumulative sum before some sorted non-forced candidate is within
    ``n*tol`` of ``threshold * total`` or when the last kept and first dropped scores are within
    ``2*tol`` (their order could swap). Used to compare against float32 implementations fairly.
    """
    B, H, n_qb, n_kb = scores.shape
    s = scores.detach().cpu().to(torch.float64)
    thr = _thresholds(threshold, H)
    cand = ref_candidates(q_len, k_len, block_size, causal).tolist()
    forced = ref_forced(q_len, k_len, block_size, causal).tolist()
    ok = torch.ones(B, H, n_qb, dtype=torch.bool)
    slack = tol * (n_kb + 1)
    for b in range(B):
        for h in range(H):
            if thr[h] >= 1.0:
                continue
            for i in range(n_qb):
                row = s[b, h, i].tolist()
                total = sum(row[j] for j in range(n_kb) if cand[i][j])
                cum = sum(row[j] for j in range(n_kb) if cand[i][j] and forced[i][j])
                others = [j for j in range(n_kb) if cand[i][j] and not forced[i][j]]
                others.sort(key=lambda j: (-row[j], j))
                target = thr[h] * total
                prev = None
                for j in others:
                    if abs(cum - target) <= slack * (1 + thr[h]):
                        ok[b, h, i] = False
                        break
                    if cum >= target:
                        if prev is not None and abs(row[prev] - row[j]) <= 2 * tol:
                            ok[b, h, i] = False
                        break
                    cum += row[j]
                    prev = j
    return ok


# --------------------------------------------------------------------------------------
# Sparse attention
# --------------------------------------------------------------------------------------


def ref_token_mask(block_mask_2d, q_len, k_len, block_size, causal):
    """Token-level visibility [Lq, Lk] for one (batch, head) block mask [nQB, nKB].

    vis[r, c] = block_mask[r // Bs, c // Bs] and (not causal or c <= p(r)).
    """
    r = torch.arange(q_len)
    c = torch.arange(k_len)
    bm = block_mask_2d.detach().cpu().to(torch.bool)
    vis = bm[r // block_size][:, c // block_size]
    if causal:
        p = k_len - q_len + r
        vis = vis & (c[None, :] <= p[:, None])
    return vis


def ref_sparse_attention(q, k, v, mask, block_size, causal=True, scale=None):
    """float64 [B, Hq, Lq, D]: dense softmax attention restricted to the visible token pairs."""
    B, Hq, Lq, D = q.shape
    _, Hkv, Lk, _ = k.shape
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    n_qb, n_kb = cdiv(Lq, block_size), cdiv(Lk, block_size)
    mask = mask.detach().cpu().to(torch.bool).expand(B, Hq, n_qb, n_kb)
    idx = _kv_index(Hq, Hkv)
    q64 = q.detach().cpu().to(torch.float64)
    k64 = k.detach().cpu().to(torch.float64)[:, idx]
    v64 = v.detach().cpu().to(torch.float64)[:, idx]
    out = torch.empty(B, Hq, Lq, v.shape[-1], dtype=torch.float64)
    cache = {}
    for b in range(B):
        for h in range(Hq):
            key = tuple(mask[b, h].flatten().tolist())
            if key not in cache:
                cache[key] = ref_token_mask(mask[b, h], Lq, Lk, block_size, causal)
            vis = cache[key]
            assert bool(vis.any(dim=-1).all()), "reference: a query row sees no key"
            logits = (q64[b, h] @ k64[b, h].T) * float(scale)
            logits = logits.masked_fill(~vis, float("-inf"))
            w = torch.softmax(logits, dim=-1)
            out[b, h] = w @ v64[b, h]
    return out


def ref_dense_attention(q, k, v, causal=True, scale=None):
    """Dense float64 attention with the causal offset p(r) = Lk - Lq + r."""
    B, Hq, Lq, _ = q.shape
    Lk = k.shape[2]
    full = torch.ones(1, 1, cdiv(Lq, 1), cdiv(Lk, 1), dtype=torch.bool)
    return ref_sparse_attention(q, k, v, full, 1, causal, scale)


def ref_density(mask, q_len, k_len, block_size, causal=True):
    """(overall, per_head[Hq]) = kept candidate blocks / candidate blocks."""
    cand = ref_candidates(q_len, k_len, block_size, causal)
    m = mask.detach().cpu().to(torch.bool)
    B, H = m.shape[:2]
    kept_h = (m & cand).sum(dim=(0, 2, 3)).to(torch.float64)
    cand_h = torch.full((H,), float(B * int(cand.sum())), dtype=torch.float64)
    return float(kept_h.sum() / cand_h.sum()), kept_h / cand_h
