"""Block-sparse attention kernel vs FlashAttention-4 and FlexAttention on the same masks, and vs
dense SDPA (cuDNN, flash) and dense FA4.

Run on a CUDA GPU:  python benchmarks/bench_sparse_attention.py --lengths 8k,32k,128k
Writes results/sparse_attention.{json,md}. TFLOP/s count only the token pairs the kept blocks
hold (causal pairs), the same basis for every method. ``vs_fa4`` is FA4's time over the row's time
on the same mask (block-sparse FA4; dense FA4 for dense rows): above 1 means faster than FA4. FA4
rows are skipped, with a message, where ``flash-attn-4`` is not installed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from common import (
    attention_tflops,
    bench_ms,
    flex_block_mask,
    gpu_info,
    parse_lengths,
    print_table,
    qkv,
    random_block_mask,
    shape_arguments,
    visible_pairs,
    write_results,
)
from torch.nn.attention import SDPBackend, sdpa_kernel

from xattention import block_sparse_attention
from xattention.block_layout import BlockLayout
from xattention.kernels.fa4 import block_sparse_attention_fa4, fa4_import_error
from xattention.kernels.sparse_attention import block_sparse_attention_triton
from xattention.plan import SparsePlan

FA4_MISSING = fa4_import_error()
if FA4_MISSING:
    print(f"FlashAttention-4 rows skipped: flash-attn-4 is not importable ({FA4_MISSING})")


def _version(dist: str) -> str:
    from importlib.metadata import version

    return version(dist)


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def main() -> None:
    ap = shape_arguments("sparse_attention")
    ap.add_argument("--densities", default="0.1,0.2")
    ap.add_argument("--no-flex", action="store_true")
    args = ap.parse_args()
    from torch.nn.attention.flex_attention import flex_attention

    flex = torch.compile(flex_attention, dynamic=False)
    bs, h, hkv, d = args.block_size, args.heads, args.kv_heads, args.head_dim
    rows = []
    cols = ["L", "method", "density", "ms", "tflops", "vs_fa4", "vs_cudnn", "speedup_vs_flex",
            "err_vs_sdpa", "err_vs_ours", "ms_incl_index"]
    meta = gpu_info() | {"heads": h, "kv_heads": hkv, "head_dim": d, "block_size": bs,
                         "dtype": "bfloat16", "causal": True,
                         "flash_attn_4": FA4_MISSING or _version("flash-attn-4")}
    for length in parse_lengths(args.lengths):
        rows += bench_length(length, args, flex)
        torch.cuda.empty_cache()
        # Written after every length: a run cut short by its time limit keeps what it measured.
        write_results(args.name, meta, rows, cols,
                      f"Block-sparse attention, B=1, H={h}/{hkv}, D={d}, bf16, causal")
    print_table(rows, cols)


def bench_length(length: int, args, flex) -> list[dict]:
    bs, h, hkv, d = args.block_size, args.heads, args.kv_heads, args.head_dim
    rows: list[dict] = []
    q, k, v = qkv(1, h, hkv, length, length, d)
    scale = d ** -0.5
    dense_pairs = h * length * (length + 1) // 2
    kr = k.repeat_interleave(h // hkv, 1) if hkv != h else k
    vr = v.repeat_interleave(h // hkv, 1) if hkv != h else v
    for name, backend in (("sdpa_flash", SDPBackend.FLASH_ATTENTION),
                          ("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION)):
        try:
            with sdpa_kernel([backend]):
                ms = bench_ms(lambda: F.scaled_dot_product_attention(q, kr, vr,
                                                                     is_causal=True))
            rows.append({"L": length, "method": name, "density": 1.0, "ms": ms,
                         "tflops": attention_tflops(dense_pairs, d, ms)})
        except RuntimeError as exc:
            print(f"{name} unavailable: {exc}")
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION]):
        ref_dense = F.scaled_dot_product_attention(q, kr, vr, is_causal=True)
    cudnn_ms = next((r["ms"] for r in rows if r["L"] == length and r["method"] == "sdpa_cudnn"),
                    float("nan"))
    fa4_dense_ms = float("nan")
    if FA4_MISSING is None:
        from flash_attn.cute import flash_attn_func

        qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
        fa4_dense = lambda: flash_attn_func(qt, kt, vt, softmax_scale=scale,  # noqa: E731
                                            causal=True)
        fa4_dense_ms = bench_ms(fa4_dense)
        rows.append({"L": length, "method": "fa4_dense", "density": 1.0, "ms": fa4_dense_ms,
                     "tflops": attention_tflops(dense_pairs, d, fa4_dense_ms),
                     "vs_cudnn": cudnn_ms / fa4_dense_ms, "vs_fa4": 1.0,
                     "err_vs_sdpa": rel_err(fa4_dense()[0].transpose(1, 2), ref_dense)})
    for r in rows:
        if r["method"].startswith("sdpa"):
            r["vs_fa4"] = fa4_dense_ms / r["ms"]
            r["vs_cudnn"] = cudnn_ms / r["ms"]

    densities = [1.0] + [float(x) for x in args.densities.split(",")]
    for density in densities:
        if density >= 1.0:
            mask = torch.ones(1, h, length // bs, length // bs, dtype=torch.bool,
                              device="cuda").tril()
        else:
            mask = random_block_mask(1, h, length, length, bs, density, seed=length)
        pairs = visible_pairs(mask[0], length, length, bs, True)
        real_density = pairs / dense_pairs
        plan = SparsePlan.from_mask(mask.expand(1, h, -1, -1),
                                    BlockLayout(length, length, bs, True))
        ours = lambda: block_sparse_attention_triton(q, k, v, plan, scale)  # noqa: E731
        out = ours()[0]
        ms = bench_ms(ours)
        ms_with_index = bench_ms(lambda: block_sparse_attention(q, k, v, mask, bs, True,
                                                                backend="triton"))
        from xattention.kernels.sparse_attention import _block_sparse_attention_fwd as kernel

        row = {"L": length, "method": "xattention_sparse", "density": real_density, "ms": ms,
               "config": str(kernel.best_config),
               "tflops": attention_tflops(pairs, d, ms), "ms_incl_index": ms_with_index,
               "vs_cudnn": cudnn_ms / ms}
        if density >= 1.0:
            row["err_vs_sdpa"] = rel_err(out, ref_dense)
        rows.append(row)
        fa4_ms = fa4_dense_ms if density >= 1.0 else float("nan")
        if FA4_MISSING is None:
            fa = lambda: block_sparse_attention_fa4(q, k, v, plan, scale)  # noqa: E731
            fa_out = fa()[0]
            fa_sparse_ms = bench_ms(fa)
            rows.append({"L": length, "method": "fa4_block_sparse", "density": real_density,
                         "ms": fa_sparse_ms, "tflops": attention_tflops(pairs, d, fa_sparse_ms),
                         "vs_cudnn": cudnn_ms / fa_sparse_ms, "vs_fa4": 1.0,
                         "err_vs_ours": rel_err(fa_out, out),
                         "ms_incl_index": bench_ms(lambda: block_sparse_attention(
                             q, k, v, mask, bs, True))})
            fa4_ms = fa_sparse_ms
        row["vs_fa4"] = fa4_ms / ms
        if not args.no_flex:
            bm = flex_block_mask(mask, length, length, bs, True)
            fl = lambda: flex(q, k, v, block_mask=bm, scale=scale,  # noqa: E731
                              enable_gqa=hkv != h)
            fout = fl()
            fms = bench_ms(fl)
            rows.append({"L": length, "method": "flex_attention", "density": real_density,
                         "ms": fms, "tflops": attention_tflops(pairs, d, fms),
                         "vs_cudnn": cudnn_ms / fms, "vs_fa4": fa4_ms / fms,
                         "err_vs_ours": rel_err(fout, out)})
            row["speedup_vs_flex"] = fms / ms
    return rows


if __name__ == "__main__":
    main()
