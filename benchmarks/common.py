"""Shared pieces of the GPU benchmarks: inputs, timing, FLOP counts, baselines, result files.

Every benchmark times with ``triton.testing.do_bench`` (CUDA events, median of many runs, L2
flushed between runs), runs its baselines in the same process on the same card, and writes
``results/<name>.json`` plus ``results/<name>.md`` with the GPU named.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
from pathlib import Path

import torch

from xattention.synthetic import structured_qkv

RESULTS = Path(os.environ.get("XATTENTION_BENCH_OUT", Path(__file__).parent / "results"))


def bench_ms(fn, warmup: int = 10, rep: int = 50) -> float:
    """Median milliseconds of ``fn()`` on the current CUDA device."""
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))


def gpu_info() -> dict:
    props = torch.cuda.get_device_properties(0)
    import triton

    return {
        "gpu": props.name,
        "sm_count": props.multi_processor_count,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def qkv(b, hq, hkv, lq, lk, d, dtype=torch.bfloat16, seed=0, structured=True):
    """Inputs on the GPU: the package's structured generator (sinks, local windows, heavy keys,
    slash lines, retrieved passages, noise), or plain normal draws."""
    if structured:
        return structured_qkv(b, hq, hkv, lq, lk, d, seed=seed, dtype=dtype, device="cuda")[:3]
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(b, hq, lq, d, device="cuda", generator=g)
    k = torch.randn(b, hkv, lk, d, device="cuda", generator=g)
    v = torch.randn(b, hkv, lk, d, device="cuda", generator=g)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def visible_pairs(mask: torch.Tensor, lq: int, lk: int, block_size: int, causal: bool) -> int:
    """Token pairs the kept blocks contain (causal pairs only when causal): the FLOP basis."""
    nqb, nkb = mask.shape[-2:]
    rows = torch.arange(lq, device=mask.device)
    row_block = rows // block_size
    pos = rows + (lk - lq)
    key_start = torch.arange(nkb, device=mask.device) * block_size
    key_end = torch.clamp(key_start + block_size, max=lk)
    if causal:
        reach = torch.minimum(pos[:, None] + 1, key_end[None, :])
        per_row = torch.clamp(reach - key_start[None, :], min=0)
    else:
        per_row = (key_end - key_start)[None, :].expand(lq, nkb)
    pairs = torch.zeros(nqb, nkb, dtype=torch.float64, device=mask.device)
    pairs.index_add_(0, row_block, per_row.to(torch.float64))
    return int((mask.to(torch.float64) * pairs).sum().item())


def attention_tflops(pairs: int, head_dim: int, ms: float) -> float:
    return 4.0 * pairs * head_dim / (ms * 1e-3) / 1e12


def random_block_mask(b, h, lq, lk, block_size, density, causal=True, seed=0):
    """Random kept blocks at ``density`` of the candidates, plus the forced sink/diagonal."""
    from xattention.block_layout import BlockLayout

    layout = BlockLayout(lq, lk, block_size, causal)
    cand, forced = layout.candidate("cuda"), layout.forced("cuda")
    g = torch.Generator(device="cuda").manual_seed(seed)
    nqb, nkb = cand.shape
    rnd = torch.rand(b, h, nqb, nkb, device="cuda", generator=g)
    # Pick a per-row probability so that the expected kept count hits density * candidates.
    n_cand = cand.sum(-1).clamp(min=1)
    n_forced = forced.sum(-1)
    want = (density * n_cand - n_forced).clamp(min=0)
    p = (want / (n_cand - n_forced).clamp(min=1)).clamp(max=1)
    mask = (rnd < p[None, None, :, None]) & cand
    return mask | forced


def flex_block_mask(mask: torch.Tensor, lq: int, lk: int, block_size: int, causal: bool):
    """The same block pattern as a FlexAttention BlockMask (full blocks skip the mask_mod)."""
    from torch.nn.attention.flex_attention import BlockMask

    from xattention.block_layout import BlockLayout
    from xattention.plan import SparsePlan

    # The plan's full/partial lists are FlexAttention's full_kv / kv lists as they are.
    plan = SparsePlan.from_mask(mask, BlockLayout(lq, lk, block_size, causal))
    offset = lk - lq

    def causal_mod(b, h, q_idx, kv_idx):
        return q_idx + offset >= kv_idx

    def all_mod(b, h, q_idx, kv_idx):
        return kv_idx < lk

    nkb = mask.shape[-1]
    partial_idx = torch.zeros(*plan.partial_index.shape[:3], nkb, dtype=torch.int32,
                              device=mask.device)
    partial_idx[..., :plan.partial_index.shape[-1]] = plan.partial_index
    return BlockMask.from_kv_blocks(
        plan.partial_count, partial_idx, plan.full_count, plan.full_index.contiguous(),
        BLOCK_SIZE=block_size, mask_mod=causal_mod if causal else all_mod, seq_lengths=(lq, lk),
    )


def write_results(name: str, meta: dict, rows: list[dict], columns: list[str], title: str) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    lines = [f"# {title}", "", f"GPU: {meta.get('gpu')}; torch {meta.get('torch')}, triton "
             f"{meta.get('triton')}; {meta.get('date')}", ""]
    lines.append("| " + " | ".join(columns) + " |")
    lines.append("|" + "---|" * len(columns))
    for r in rows:
        cells = []
        for c in columns:
            x = r.get(c, "")
            cells.append(f"{x:.3g}" if isinstance(x, float) and not math.isnan(x) else str(x))
        lines.append("| " + " | ".join(cells) + " |")
    path = RESULTS / f"{name}.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def print_table(rows: list[dict], columns: list[str]) -> None:
    widths = [max(len(c), *(len(_fmt(r.get(c, ""))) for r in rows)) for c in columns]
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths, strict=True)))
    for r in rows:
        print("  ".join(_fmt(r.get(c, "")).rjust(w) for c, w in zip(columns, widths, strict=True)))


def _fmt(x) -> str:
    return f"{x:.3g}" if isinstance(x, float) else str(x)


def shape_arguments(name: str) -> argparse.ArgumentParser:
    """The options every benchmark shares: lengths, head counts, head_dim, block size, name."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", default="8k,32k,128k")
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=32)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--block-size", type=int, default=128)
    ap.add_argument("--name", default=name)
    return ap


def parse_lengths(text: str) -> list[int]:
    out = []
    for part in text.split(","):
        part = part.strip().lower()
        out.append(int(float(part[:-1]) * 1024) if part.endswith("k") else int(part))
    return out
