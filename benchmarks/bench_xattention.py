"""Whole ``xattention()`` (estimate + select + sparse attention) vs dense cuDNN / flash SDPA.

Run on a CUDA GPU:  python benchmarks/bench_xattention.py --lengths 8k,32k,128k
Structured inputs (sink, local windows, heavy keys); density measured from the returned masks.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from common import bench_ms, gpu_info, parse_lengths, print_table, qkv, write_results
from torch.nn.attention import SDPBackend, sdpa_kernel

from xattention import block_density, xattention


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", default="8k,32k,128k")
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=32)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--thresholds", default="0.9,0.95")
    ap.add_argument("--stride", type=int, default=8)
    ap.add_argument("--block-size", type=int, default=128)
    ap.add_argument("--name", default="xattention")
    args = ap.parse_args()
    bs, h, hkv, d, s = args.block_size, args.heads, args.kv_heads, args.head_dim, args.stride
    rows = []
    for length in parse_lengths(args.lengths):
        rows += bench_length(length, args)
        torch.cuda.empty_cache()
    cols = ["L", "method", "ms", "density", "speedup_vs_cudnn", "rel_err"]
    meta = gpu_info() | {"heads": h, "kv_heads": hkv, "head_dim": d, "block_size": bs,
                         "stride": s, "dtype": "bfloat16", "causal": True,
                         "inputs": "structured synthetic (benchmarks/common.py:qkv)"}
    write_results(args.name, meta, rows, cols,
                  f"xattention() end to end, B=1, H={h}/{hkv}, D={d}, bf16, causal")
    print_table(rows, cols)


def bench_length(length: int, args) -> list[dict]:
    bs, h, hkv, d, s = args.block_size, args.heads, args.kv_heads, args.head_dim, args.stride
    rows: list[dict] = []
    q, k, v = qkv(1, h, hkv, length, length, d)
    kr = k.repeat_interleave(h // hkv, 1) if hkv != h else k
    vr = v.repeat_interleave(h // hkv, 1) if hkv != h else v
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
        cudnn_ms = bench_ms(lambda: F.scaled_dot_product_attention(q, kr, vr, is_causal=True))
        ref = F.scaled_dot_product_attention(q, kr, vr, is_causal=True)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        flash_ms = bench_ms(lambda: F.scaled_dot_product_attention(q, kr, vr, is_causal=True))
    rows.append({"L": length, "method": "sdpa_cudnn", "ms": cudnn_ms})
    rows.append({"L": length, "method": "sdpa_flash", "ms": flash_ms,
                 "speedup_vs_cudnn": cudnn_ms / flash_ms})
    for thr in (float(t) for t in args.thresholds.split(",")):
        def run(thr=thr):
            return xattention(q, k, v, threshold=thr, stride=s, block_size=bs,
                              return_mask=True)
        out, mask = run()
        ms = bench_ms(run)
        dens = block_density(mask, length, length, bs)["overall"]
        err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
        rows.append({"L": length, "method": f"xattention t={thr} S={s}", "ms": ms,
                     "density": dens, "speedup_vs_cudnn": cudnn_ms / ms, "rel_err": err})
        del out, mask
    return rows


if __name__ == "__main__":
    main()
