"""A prefill over a paged KV cache: read in place (``PagedKV``) vs gathered first vs contiguous.

What a serving engine pays per layer and request. For each length this times, on K/V scattered
over random 16-token pages of a cache (vLLM's CUDA layout, ``[pages, 2, 16, Hkv, D]``):

- ``contiguous``: ``xattention(q, k, v)`` on K/V that were never paged (the floor);
- ``paged (in place)``: ``xattention(q, PagedKV(...), None)``: the kernels read through the table;
- ``gather + xattention``: the request's K/V copied out of the pages, then the contiguous call
  (what the vLLM backend did before ``XATTENTION_KV_READ=paged``);
- ``sdpa_cudnn (gathered K/V)``: the dense baseline, on K/V gathered and repeated for GQA;

with ``do_bench`` medians and the peak memory each allocates beyond its inputs. Threshold 0.9,
stride 8, causal, bf16, Qwen2.5-1.5B's heads (12 query / 2 KV) by default.

Run on a CUDA GPU:  python benchmarks/bench_paged.py --lengths 8k,16k,32k
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from common import (
    bench_ms,
    gpu_info,
    parse_lengths,
    print_table,
    qkv,
    shape_arguments,
    write_results,
)
from torch.nn.attention import SDPBackend, sdpa_kernel

from xattention import PagedKV, xattention

PAGE = 16


def paged_copy(k: torch.Tensor, v: torch.Tensor, seed: int) -> PagedKV:
    """``k, v [1, Hkv, L, D]`` written over shuffled pages of a ``[pages, 2, PAGE, Hkv, D]``
    cache with 10% spare pages, as vLLM 0.25's Triton backend lays it out."""
    _, heads, length, dim = k.shape
    used = -(-length // PAGE)
    num = used + used // 10 + 1
    cache = torch.zeros(num, 2, PAGE, heads, dim, dtype=k.dtype, device=k.device)
    g = torch.Generator(device="cpu").manual_seed(seed)
    table = torch.randperm(num, generator=g)[:used].to(device=k.device, dtype=torch.int32)
    pad = used * PAGE - length
    for i, x in enumerate((k, v)):
        rows = torch.nn.functional.pad(x[0].transpose(0, 1), (0, 0, 0, 0, 0, pad))
        cache[table.long(), i] = rows.view(used, PAGE, heads, dim)
    return PagedKV(cache[:, 0], cache[:, 1], table[None], length)


def peak_extra_mib(fn) -> float:
    """MiB the call allocates at its peak beyond what was allocated before it."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def bench_length(length: int, hq: int, hkv: int, d: int, block_size: int) -> list[dict]:
    q, k, v = qkv(1, hq, hkv, length, length, d)
    kv = paged_copy(k, v, seed=length)
    opts = dict(threshold=0.9, stride=8, block_size=block_size, min_sparse_len=0)

    def gathered():
        gk, gv = kv.gather()
        return xattention(q, gk, gv, **opts)

    def cudnn():
        gk, gv = kv.gather()
        gk, gv = (x.repeat_interleave(hq // hkv, 1) for x in (gk, gv))
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            return F.scaled_dot_product_attention(q, gk, gv, is_causal=True)

    variants = {
        "contiguous (never paged)": lambda: xattention(q, k, v, **opts),
        "paged (in place)": lambda: xattention(q, kv, None, **opts),
        "gather + xattention": gathered,
        "sdpa_cudnn (gathered K/V)": cudnn,
    }
    ref = variants["contiguous (never paged)"]()
    density = xattention(q, kv, None, return_plan=True, **opts)[1].density()
    rows = []
    for name, fn in variants.items():
        out = fn()
        err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
        rows.append({"L": length, "variant": name, "ms": bench_ms(fn),
                     "density": 1.0 if name.startswith("sdpa") else density,
                     "peak_extra_mib": peak_extra_mib(fn), "rel_err_vs_contiguous": err})
    base = rows[-1]["ms"]
    for r in rows:
        r["speedup_vs_cudnn"] = base / r["ms"]
    return rows


def main() -> None:
    ap = shape_arguments("paged")
    ap.set_defaults(lengths="8k,16k,32k", heads=12, kv_heads=2)
    args = ap.parse_args()
    rows = []
    for length in parse_lengths(args.lengths):
        rows += bench_length(length, args.heads, args.kv_heads, args.head_dim, args.block_size)
    cols = ["L", "variant", "ms", "speedup_vs_cudnn", "density", "peak_extra_mib",
            "rel_err_vs_contiguous"]
    meta = gpu_info() | {"heads": f"{args.heads}/{args.kv_heads}", "head_dim": args.head_dim,
                         "block_size": args.block_size, "page_size": PAGE, "threshold": 0.9,
                         "stride": 8, "dtype": "bfloat16", "causal": True}
    write_results(args.name, meta, rows, cols,
                  f"Prefill over a paged KV cache: in place vs gathered, H={args.heads}/"
                  f"{args.kv_heads}, D={args.head_dim}, pages of {PAGE}, bf16, causal, t=0.9")
    print_table(rows, cols)


if __name__ == "__main__":
    main()
