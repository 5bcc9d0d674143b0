"""Antidiagonal estimate: the fused Triton kernel vs a materialising implementation.

The original XAttention estimate writes the ``(L/S)^2`` score matrix and reads it twice; we cannot
run its code here, so the baseline is the same dataflow in PyTorch (cuBLAS strided product written
to memory, then softmax and block sums), and the original's measured figures (below) sit
beside it in the table. Also times the selection and the block-index build that follow.

FP8 operands (``--estimate-dtypes bf16,fp8``) get their own rows, with their error against the
PyTorch path on the same rounded operands (up to 32k) and the cost of rounding q and k alone.
``--sweep L`` also times every config full tuning may pick at length ``L``, forced one by one.

Run on a CUDA GPU:  python benchmarks/bench_estimate.py --lengths 8k,32k,128k
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

from xattention import estimate_block_scores
from xattention.block_layout import BlockLayout
from xattention.estimate import strided_keys, strided_queries
from xattention.kernels import estimate as kernel_module
from xattention.kernels._tuning import force_config
from xattention.kernels.quantize import quantize_per_head_triton
from xattention.selection import _select_plan

DTYPES = {"bf16": None, "fp8": torch.float8_e4m3fn}

# The original implementation's estimate, GQA 32/8, D=128, bf16 (ms; {L: {S: ms}}), per card: a
# speed-up is only quoted against the original timed on the same card. H100: docs/design.md §12;
# H200: the same-card figures at 128k (benchmarks/NOTES.md, run 10).
ORIGINAL_MS = {"H100": {8192: {8: 1.23, 16: 0.75}, 32768: {8: 3.78, 16: 2.94},
                        131072: {8: 40.5, 16: 27.9}},
               "H200": {131072: {8: 39.3, 16: 29.2}}}


def original_ms(length: int, stride: int) -> float:
    """The original's time on this run's card, NaN where it was not timed there."""
    name = torch.cuda.get_device_name()
    card = next((c for c in ORIGINAL_MS if c in name), None)
    return ORIGINAL_MS.get(card, {}).get(length, {}).get(stride, float("nan"))


def materialised_estimate(q, k, stride, block_size, heads_per_chunk=4):
    """Write A = Q_str K_str^T (bf16) per head chunk, then softmax and block sums from memory."""
    b, hq, lq, d = q.shape
    lk = k.shape[2]
    gpb = block_size // stride
    nqg, nkg = -(-lq // stride), -(-lk // stride)
    nqb, nkb = -(-lq // block_size), -(-lk // block_size)
    out = torch.empty(b, hq, nqb, nkb, device=q.device)
    allowed = (torch.arange(nkg, device=q.device)[None, :] * stride
               <= (torch.arange(nqg, device=q.device)[:, None] * stride + stride - 1))
    for h0 in range(0, hq, heads_per_chunk):
        qs = strided_queries(q[:, h0:h0 + heads_per_chunk], stride, q.dtype)
        ks = strided_keys(k[:, h0:h0 + heads_per_chunk], stride, k.dtype)
        a = torch.matmul(qs, ks.transpose(-1, -2))  # the (L/S)^2 matrix, written once
        a = a.float().mul_(d ** -0.5 / stride).masked_fill_(~allowed, float("-inf"))
        p = torch.softmax(a, -1)
        p = F.pad(p, (0, nkb * gpb - nkg, 0, nqb * gpb - nqg))
        blocks = p.unflatten(-1, (nkb, gpb)).sum(-1).unflatten(-2, (nqb, gpb)).sum(-2)
        out[:, h0:h0 + heads_per_chunk] = blocks / blocks.sum(-1, keepdim=True)
    return out


def main() -> None:
    ap = shape_arguments("estimate")
    ap.add_argument("--strides", default="8,16")
    ap.add_argument("--estimate-dtypes", default="bf16",
                    help="comma list of bf16 (products in bf16) and fp8 (e4m3 operands)")
    ap.add_argument("--sweep", default="", help="a length at which to time every kept config")
    args = ap.parse_args()
    bs, h, hkv, d = args.block_size, args.heads, args.kv_heads, args.head_dim
    rows = []
    for length in parse_lengths(args.lengths):
        rows += bench_length(length, args)
        torch.cuda.empty_cache()
    if args.sweep:
        sweep_rows = sweep_configs(parse_lengths(args.sweep)[0], args)
        sweep_cols = ["L", "S", "operands", "config", "ms", "tflops"]
        write_results(args.name + "_sweep", gpu_info(), sweep_rows, sweep_cols,
                      f"Estimate, every kept config forced, H={h}/{hkv}, D={d}, causal")
        print_table(sweep_rows, sweep_cols)
    cols = ["L", "S", "operands", "fused_ms", "fused_tflops", "original_ms(same card)",
            "vs_original", "quantize_ms", "max_abs_err_vs_torch", "materialised_ms",
            "max_abs_err_vs_materialised", "select_ms", "index_ms"]
    meta = gpu_info() | {"heads": h, "kv_heads": hkv, "head_dim": d, "block_size": bs,
                         "dtype": "bfloat16", "causal": True}
    write_results(args.name, meta, rows, cols,
                  f"Antidiagonal estimate, B=1, H={h}/{hkv}, D={d}, bf16, causal")
    print_table(rows, cols)


def bench_length(length: int, args) -> list[dict]:
    bs, h, hkv, d = args.block_size, args.heads, args.kv_heads, args.head_dim
    rows: list[dict] = []
    q, k, _ = qkv(1, h, hkv, length, length, d)
    for stride, name in ((int(s), n) for s in args.strides.split(",")
                         for n in args.estimate_dtypes.split(",")):
        dtype = DTYPES[name]
        fused = lambda: estimate_block_scores(q, k, stride, bs, True, backend="triton",  # noqa: E731
                                              estimate_dtype=dtype)
        scores = fused()
        ms = bench_ms(fused)
        # Useful work: the causal half of the strided product, 2 * (L/S)^2/2 * S*D per head.
        flops = h * (length / stride) ** 2 * stride * d
        kernel = kernel_module._antidiagonal_estimate_fwd
        row = {"L": length, "S": stride, "operands": name, "fused_ms": ms,
               "fused_tflops": flops / ms / 1e9, "config": str(kernel.best_config),
               "original_ms(same card)": original_ms(length, stride)}
        row["vs_original"] = row["original_ms(same card)"] / ms
        if dtype is not None:
            row["quantize_ms"] = bench_ms(lambda: (quantize_per_head_triton(q),
                                                   quantize_per_head_triton(k, center=True)))
        if length <= 32768:  # the PyTorch path on the same (rounded) operands
            ref = estimate_block_scores(q, k, stride, bs, True, backend="torch",
                                        estimate_dtype=dtype)
            row["max_abs_err_vs_torch"] = (scores - ref).abs().max().item()
            del ref
        if hkv == h and dtype is None:
            ref = materialised_estimate(q, k, stride, bs)
            row["max_abs_err_vs_materialised"] = (scores - ref).abs().max().item()
            row["materialised_ms"] = bench_ms(lambda: materialised_estimate(q, k, stride, bs),
                                              warmup=2, rep=10)
            del ref
        # The selection kernel writes the plan itself (no separate compaction to time).
        layout = BlockLayout(length, length, bs, True)
        row["select_ms"] = bench_ms(lambda: _select_plan(scores, 0.9, layout, "auto"))
        rows.append(row)
    return rows


def _sweep_cases(args) -> list[tuple[int, str, object]]:
    """(stride, operands, config) for every config the pruner keeps at these shapes."""
    g_tile = kernel_module._head_tile(args.heads // args.kv_heads)
    cases = []
    for stride in (int(s) for s in args.strides.split(",")):
        for name in args.estimate_dtypes.split(","):
            elem = 1 if DTYPES[name] is not None else 2
            d_pad = kernel_module.padded_head_dim(args.head_dim, elem)
            cases += [(stride, name, c) for c in kernel_module.kept_configs(
                args.block_size // stride, g_tile, d_pad, False, elem)]
    return cases


def _compile_one(case, args) -> None:
    """Compile one forced config on a short input (Triton caches it on disk for the sweep)."""
    stride, name, config = case
    q, k, _ = qkv(1, args.heads, args.kv_heads, 4096, 4096, args.head_dim)
    with force_config(kernel_module._antidiagonal_estimate_fwd, config):
        estimate_block_scores(q, k, stride, args.block_size, True, backend="triton",
                              estimate_dtype=DTYPES[name])
    torch.cuda.synchronize()


def sweep_configs(length: int, args) -> list[dict]:
    """Every config full tuning may pick for this shape, forced one at a time (compiled first in
    parallel processes: compiling, not timing, is most of a sweep's cost)."""
    import concurrent.futures
    import multiprocessing

    bs, h, hkv, d = args.block_size, args.heads, args.kv_heads, args.head_dim
    cases = _sweep_cases(args)
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(min(12, len(cases)), mp_context=ctx) as pool:
        list(pool.map(_compile_one, cases, [args] * len(cases)))
    q, k, _ = qkv(1, h, hkv, length, length, d)
    rows = []
    for stride, name, config in cases:
        with force_config(kernel_module._antidiagonal_estimate_fwd, config):
            ms = bench_ms(lambda: estimate_block_scores(  # noqa: B023
                q, k, stride, bs, True, backend="triton", estimate_dtype=DTYPES[name]), rep=20)
        flops = h * (length / stride) ** 2 * stride * d
        rows.append({"L": length, "S": stride, "operands": name, "config": str(config),
                     "ms": ms, "tflops": flops / ms / 1e9})
        print(rows[-1], flush=True)
    return rows


if __name__ == "__main__":
    main()
