"""Block-sparse attention kernel vs FlexAttention on the same masks, and vs dense SDPA.

Run on a CUDA GPU:  python benchmarks/bench_sparse_attention.py --lengths 8k,32k,128k
Writes results/sparse_attention.{json,md}. TFLOP/s count only the token pairs the kept blocks
hold (causal pairs), the same basis for every method.
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
from xattention.kernels.sparse_attention import block_sparse_attention_triton, build_block_index


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
    for length in parse_lengths(args.lengths):
        rows += bench_length(length, args, flex)
        torch.cuda.empty_cache()
    cols = ["L", "method", "density", "ms", "tflops", "vs_cudnn", "speedup_vs_flex",
            "err_vs_sdpa", "err_vs_ours", "ms_incl_index"]
    meta = gpu_info() | {"heads": h, "kv_heads": hkv, "head_dim": d, "block_size": bs,
                         "dtype": "bfloat16", "causal": True}
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

    densities = [1.0] + [float(x) for x in args.densities.split(",")]
    for density in densities:
        if density >= 1.0:
            mask = torch.ones(1, h, length // bs, length // bs, dtype=torch.bool,
                              device="cuda").tril()
        else:
            mask = random_block_mask(1, h, length, length, bs, density, seed=length)
        pairs = visible_pairs(mask[0], length, length, bs, True)
        real_density = pairs / dense_pairs
        index = build_block_index(mask, length, length, bs, True)
        ours = lambda: block_sparse_attention_triton(q, k, v, mask, bs, True, scale,  # noqa: E731
                                                     block_index=index)
        out = ours()[0]
        ms = bench_ms(ours)
        ms_with_index = bench_ms(lambda: block_sparse_attention(q, k, v, mask, bs, True))
        from xattention.kernels.sparse_attention import _block_sparse_attention_fwd as kernel

        row = {"L": length, "method": "xattention_sparse", "density": real_density, "ms": ms,
               "config": str(kernel.best_config),
               "tflops": attention_tflops(pairs, d, ms), "ms_incl_index": ms_with_index,
               "vs_cudnn": cudnn_ms / ms}
        if density >= 1.0:
            row["err_vs_sdpa"] = rel_err(out, ref_dense)
        rows.append(row)
        if not args.no_flex:
            bm = flex_block_mask(mask, length, length, bs, True)
            fl = lambda: flex(q, k, v, block_mask=bm, scale=scale,  # noqa: E731
                              enable_gqa=hkv != h)
            fout = fl()
            fms = bench_ms(fl)
            rows.append({"L": length, "method": "flex_attention", "density": real_density,
                         "ms": fms, "tflops": attention_tflops(pairs, d, fms),
                         "vs_cudnn": cudnn_ms / fms, "err_vs_ours": rel_err(fout, out)})
            row["speedup_vs_flex"] = fms / ms
    return rows


if __name__ == "__main__":
    main()
