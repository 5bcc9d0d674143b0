"""Whole ``xattention()`` (estimate + select + sparse attention) vs dense cuDNN / flash SDPA.

Run on a CUDA GPU:  python benchmarks/bench_xattention.py --lengths 8k,32k,128k
Structured synthetic inputs (sink, local windows, heavy keys): rows at fixed thresholds, and rows
at the threshold that reaches ~10% / ~20% density (found by bisection on the estimate's scores),
the density range of docs/design.md §12. With ``--real FILE`` (from capture_real_qkv.py) it
runs on Q/K/V captured from a real model instead; ``--real`` and ``--crossover`` time each call
eager and replayed from a CUDA graph (``XAttentionGraph``), against cuDNN and FA4 dense.
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

from xattention import block_density, estimate_block_scores, select_blocks, xattention
from xattention.graphs import XAttentionGraph


def rel_err(out, ref) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def dense_reference(q, k, v):
    """cuDNN causal attention time (ms) and output; K/V repeated for GQA."""
    group = q.shape[1] // k.shape[1]
    kr = k.repeat_interleave(group, 1) if group > 1 else k
    vr = v.repeat_interleave(group, 1) if group > 1 else v
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
        ms = bench_ms(lambda: F.scaled_dot_product_attention(q, kr, vr, is_causal=True))
        ref = F.scaled_dot_product_attention(q, kr, vr, is_causal=True)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        flash_ms = bench_ms(lambda: F.scaled_dot_product_attention(q, kr, vr, is_causal=True))
    return ms, flash_ms, ref


def fa4_dense_ms(q, k, v) -> float:
    """Dense causal FA4 (no K/V repeat: it maps GQA heads itself); NaN where not installed."""
    from xattention.kernels.fa4 import fa4_import_error

    if fa4_import_error():
        return float("nan")
    from flash_attn.cute import flash_attn_func

    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
    return bench_ms(lambda: flash_attn_func(qt, kt, vt, causal=True))


def time_xattention(q, k, v, ref, thr, stride, bs, cudnn_ms, min_sparse_len=0,
                    estimate_dtype=None, graph=False) -> dict:
    """min_sparse_len=0 times the sparse pipeline at every length; None, the automatic switch.
    ``graph``: also time the call replayed from a CUDA graph (XAttentionGraph, inputs in place)."""
    length = q.shape[2]
    options = dict(threshold=thr, stride=stride, block_size=bs, min_sparse_len=min_sparse_len,
                   estimate_dtype=estimate_dtype)
    # The mask is built from the plan only on request: the timed call does not ask for it.
    out, mask = xattention(q, k, v, return_mask=True, **options)
    ms = bench_ms(lambda: xattention(q, k, v, **options))
    row = {"ms": ms, "density": block_density(mask, length, length, bs)["overall"],
           "speedup_vs_cudnn": cudnn_ms / ms, "rel_err": rel_err(out, ref)}
    if graph:
        g = XAttentionGraph(threshold=thr, stride=stride, block_size=bs,
                            min_sparse_len=min_sparse_len, estimate_dtype=estimate_dtype)
        g(q, k, v)
        inputs = g.inputs(q, k, v)
        row["graph_ms"] = gms = bench_ms(lambda: g(*inputs))
        row["graph_vs_cudnn"] = cudnn_ms / gms
        del g
    return row


def threshold_for_density(scores, target: float, length: int, bs: int) -> float:
    lo, hi = 0.0, 1.0
    for _ in range(30):
        mid = (lo + hi) / 2
        mask = select_blocks(scores, mid, q_len=length, k_len=length, block_size=bs)
        if block_density(mask, length, length, bs)["overall"] < target:
            lo = mid
        else:
            hi = mid
    return hi


def bench_length(length: int, args) -> list[dict]:
    bs, h, hkv, d = args.block_size, args.heads, args.kv_heads, args.head_dim
    q, k, v = qkv(1, h, hkv, length, length, d)
    cudnn_ms, flash_ms, ref = dense_reference(q, k, v)
    fa4_ms = fa4_dense_ms(q, k, v)
    rows = [{"L": length, "method": "sdpa_cudnn", "ms": cudnn_ms, "speedup_vs_cudnn": 1.0},
            {"L": length, "method": "sdpa_flash", "ms": flash_ms,
             "speedup_vs_cudnn": cudnn_ms / flash_ms}]
    if fa4_ms == fa4_ms:
        rows.append({"L": length, "method": "fa4_dense", "ms": fa4_ms,
                     "speedup_vs_cudnn": cudnn_ms / fa4_ms})
    for s in (int(x) for x in args.strides.split(",")):
        for thr in (float(t) for t in args.thresholds.split(",")):
            for name in args.estimate_dtypes.split(","):
                fp8 = name == "fp8"
                rows.append({"L": length, "method": f"xattention t={thr} S={s}"
                             + (" fp8 estimate" if fp8 else "")}
                            | time_xattention(q, k, v, ref, thr, s, bs, cudnn_ms,
                                              estimate_dtype=torch.float8_e4m3fn if fp8
                                              else None))
        scores = estimate_block_scores(q, k, s, bs)
        for target in (float(t) for t in args.target_densities.split(",") if t):
            thr = threshold_for_density(scores, target, length, bs)
            label = f"1-{1 - thr:.1e}" if thr > 0.999 else f"{thr:.4g}"
            rows.append({"L": length, "method": f"xattention t={label} S={s} (~{target:.0%})",
                         "threshold": thr}
                        | time_xattention(q, k, v, ref, thr, s, bs, cudnn_ms))
    return rows


def bench_real(paths: str, args) -> list[dict]:
    """Layers of a real model (capture_real_qkv.py files, comma-separated): density and speed at
    fixed thresholds, eager and graph-replayed, against cuDNN and FA4 dense."""
    rows = []
    for path in paths.split(","):
        data = torch.load(path)
        for layer, tensors in data["layers"].items():
            q, k, v = (t.cuda() for t in tensors)
            length = q.shape[2]
            cudnn_ms, _, ref = dense_reference(q, k, v)
            fa4_ms = fa4_dense_ms(q, k, v)
            base = {"model": data["model"], "layer": layer, "L": length}
            rows.append(base | {"method": "sdpa_cudnn", "ms": cudnn_ms,
                                "speedup_vs_cudnn": 1.0})
            if fa4_ms == fa4_ms:
                rows.append(base | {"method": "fa4_dense", "ms": fa4_ms,
                                    "speedup_vs_cudnn": cudnn_ms / fa4_ms})
            for thr in (float(t) for t in args.thresholds.split(",")):
                for stride in (int(x) for x in args.strides.split(",")):
                    rows.append(base | {"method": f"xattention t={thr} S={stride}"}
                                | time_xattention(q, k, v, ref, thr, stride, args.block_size,
                                                  cudnn_ms, graph=True))
            del q, k, v, ref
            torch.cuda.empty_cache()
    return rows


def bench_crossover(args) -> list[dict]:
    """Short inputs: the whole sparse call against dense cuDNN per length and head count, and the
    automatic switch (min_sparse_len=None) that should never lose."""
    rows = []
    for heads in (h.split("/") for h in args.crossover.split(",")):
        hq, hkv = int(heads[0]), int(heads[1])
        for length in parse_lengths(args.lengths):
            q, k, v = qkv(1, hq, hkv, length, length, args.head_dim)
            cudnn_ms, _, ref = dense_reference(q, k, v)
            base = {"heads": f"{hq}/{hkv}", "L": length, "cudnn_ms": cudnn_ms,
                    "fa4_ms": fa4_dense_ms(q, k, v)}
            for stride in (int(x) for x in args.strides.split(",")):
                sparse = time_xattention(q, k, v, ref, 0.9, stride, args.block_size, cudnn_ms,
                                         graph=True)
                auto = time_xattention(q, k, v, ref, 0.9, stride, args.block_size, cudnn_ms,
                                       min_sparse_len=None)
                rows.append(base | {"S": stride, "sparse_ms": sparse["ms"],
                                    "sparse_vs_cudnn": sparse["speedup_vs_cudnn"],
                                    "density": sparse["density"],
                                    "graph_ms": sparse["graph_ms"],
                                    "graph_vs_cudnn": sparse["graph_vs_cudnn"],
                                    "auto_ms": auto["ms"],
                                    "auto_vs_cudnn": auto["speedup_vs_cudnn"]})
            torch.cuda.empty_cache()
    return rows


def main() -> None:
    ap = shape_arguments("xattention")
    ap.add_argument("--thresholds", default="0.9,0.95")
    ap.add_argument("--target-densities", default="0.1,0.2")
    ap.add_argument("--strides", default="8,16")
    ap.add_argument("--estimate-dtypes", default="bf16",
                    help="bf16,fp8: also time the FP8 estimate at the fixed thresholds")
    ap.add_argument("--real", default="",
                    help="files written by capture_real_qkv.py, comma-separated")
    ap.add_argument("--crossover", default="",
                    help="head counts like 32/8,8/2: time short inputs sparse vs dense instead")
    args = ap.parse_args()
    if args.crossover:
        rows = bench_crossover(args)
        cols = ["heads", "L", "S", "cudnn_ms", "fa4_ms", "sparse_ms", "sparse_vs_cudnn",
                "graph_ms", "graph_vs_cudnn", "density", "auto_ms", "auto_vs_cudnn"]
        meta = gpu_info() | {"head_dim": args.head_dim, "block_size": args.block_size,
                             "threshold": 0.9, "dtype": "bfloat16", "causal": True}
        write_results(args.name + "_crossover", meta, rows, cols,
                      f"Short inputs: xattention() (t=0.9) vs dense cuDNN, D={args.head_dim}, "
                      "bf16, causal; auto = the automatic dense switch")
        print_table(rows, cols)
        return
    if args.real:
        rows = bench_real(args.real, args)
        cols = ["model", "layer", "L", "method", "ms", "graph_ms", "density",
                "speedup_vs_cudnn", "graph_vs_cudnn", "rel_err"]
        meta = gpu_info() | {"block_size": args.block_size, "dtype": "bfloat16", "causal": True,
                             "inputs": f"captured by capture_real_qkv.py ({args.real})"}
        write_results(args.name + "_real", meta, rows, cols,
                      "xattention() on Q/K/V captured from a real model, bf16, causal")
        print_table(rows, cols)
        return
    rows = []
    cols = ["L", "method", "ms", "density", "speedup_vs_cudnn", "rel_err"]
    meta = gpu_info() | {"heads": args.heads, "kv_heads": args.kv_heads,
                         "head_dim": args.head_dim, "block_size": args.block_size,
                         "strides": args.strides, "dtype": "bfloat16", "causal": True,
                         "inputs": "structured synthetic (benchmarks/common.py:qkv)"}
    for length in parse_lengths(args.lengths):
        rows += bench_length(length, args)
        torch.cuda.empty_cache()
        write_results(args.name, meta, rows, cols,  # after every length (time limits)
                      f"xattention() end to end, B=1, H={args.heads}/{args.kv_heads}, "
                      f"D={args.head_dim}, bf16, causal")
    print_table(rows, cols)


if __name__ == "__main__":
    main()
