"""Where a short ``xattention()`` call spends: host time, device time and launches, stage by stage.

At 1k-8k tokens the device work of the whole pipeline is a few tens of microseconds, so a call
costs what the host spends issuing it. For each length this times, against dense cuDNN:

- ``gpu_ms``: ``do_bench`` medians (device events; a host-bound call shows its host time here);
- ``host_us``: host microseconds per call, from many calls issued back to back without a sync;
- ``launches``: kernels per call, counted by the PyTorch profiler;

for SDPA (cuDNN), the automatic dense branch of ``xattention()``, the sparse pipeline forced
(``min_sparse_len=0``) eager (with the launch cache of kernels/_launch.py, and without it), the
same call through ``XAttentionGraph`` (``graph``: the inputs
copied into the captured buffers, then one replay; ``replay``: inputs already in the buffers, the
replay alone), and each of its three stages alone (estimate + flags, selection -> plan, attention).

Run on a CUDA GPU:  python benchmarks/bench_short_calls.py --lengths 1k,2k,4k,8k,16k,32k
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from common import bench_ms, gpu_info, parse_lengths, print_table, qkv, write_results
from torch.nn.attention import SDPBackend, sdpa_kernel

from xattention import xattention
from xattention.block_layout import BlockLayout
from xattention.estimate import _estimate_with_flags
from xattention.graphs import XAttentionGraph
from xattention.kernels._launch import launch_cache
from xattention.selection import _select_plan
from xattention.sparse_attention import _sparse_attention


def host_us(fn, calls: int = 200) -> float:
    """Host microseconds per call, issued back to back (the GPU trails behind)."""
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - t0
    torch.cuda.synchronize()
    return elapsed / calls * 1e6


def _uncached(fn, *args, **kwargs):
    """``fn`` with every kernel launched through Triton's own path (kernels/_launch.py)."""
    with launch_cache(False):
        return fn(*args, **kwargs)


def _cached(fn, *args, **kwargs):
    """``fn`` with repeat launches replayed by the launch cache (off by default for now)."""
    with launch_cache(True):
        return fn(*args, **kwargs)


def launches(fn) -> int:
    """Kernels one call launches."""
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def bench_length(length: int, hq: int, hkv: int, d: int, block_size: int, stride: int
                 ) -> list[dict]:
    q, k, v = qkv(1, hq, hkv, length, length, d)
    scale = d ** -0.5
    layout = BlockLayout(length, length, block_size, True)
    scores, flags = _estimate_with_flags(q, k, v, stride, block_size, True, scale, "auto")
    plan = _select_plan(scores, 0.9, layout, "auto", inputs=(q, k, v), flags=flags)
    graph = XAttentionGraph(threshold=0.9, stride=stride, block_size=block_size,
                            min_sparse_len=0)
    graph(q, k, v)  # capture
    gq, gk, gv = graph.inputs(q, k, v)
    q2, k2, v2 = (x.clone() for x in (q, k, v))  # other tensors: copied in on each call
    kr, vr = (x.repeat_interleave(hq // hkv, 1) for x in (k, v))

    def cudnn():
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            return F.scaled_dot_product_attention(q, kr, vr, is_causal=True)

    def cudnn_gqa():
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    variants = {
        "sdpa_cudnn (K/V repeated beforehand)": cudnn,
        "sdpa_cudnn enable_gqa (no repeat)": cudnn_gqa,
        "xattention auto (dense branch)": lambda: xattention(q, k, v, 0.9, stride, block_size),
        "xattention sparse eager (min_sparse_len=0)": lambda: xattention(
            q, k, v, 0.9, stride, block_size, min_sparse_len=0),
        "xattention sparse eager, launch cache off": lambda: _uncached(
            xattention, q, k, v, 0.9, stride, block_size, min_sparse_len=0),
        "xattention sparse eager, launch cache on": lambda: _cached(
            xattention, q, k, v, 0.9, stride, block_size, min_sparse_len=0),
        "xattention sparse graph (copy in + replay)": lambda: graph(q2, k2, v2),
        "xattention sparse replay (inputs in place)": lambda: graph(gq, gk, gv),
        "  estimate (+ non-finite flags)": lambda: _estimate_with_flags(
            q, k, v, stride, block_size, True, scale, "auto"),
        "  selection (-> plan)": lambda: _select_plan(scores, 0.9, layout, "auto",
                                                      inputs=(q, k, v), flags=flags),
        "  sparse attention (plan)": lambda: _sparse_attention(q, k, v, plan, block_size, True,
                                                               scale, "auto", False),
    }
    rows = []
    for name, fn in variants.items():
        try:
            rows.append({"L": length, "heads": f"{hq}/{hkv}", "variant": name,
                         "gpu_ms": bench_ms(fn), "host_us": host_us(fn),
                         "launches": launches(fn)})
        except RuntimeError as exc:  # e.g. a backend that does not take GQA
            print(f"{name}: {exc}"[:200])
    return rows


def profile_host(length: int, args) -> None:
    """cProfile of the host side of the forced sparse call: where its microseconds go."""
    import cProfile
    import io
    import pstats

    q, k, v = qkv(1, args.heads, args.kv_heads, length, length, args.head_dim)

    def call():
        return xattention(q, k, v, 0.9, args.stride, args.block_size, min_sparse_len=0)

    for _ in range(5):
        call()
    torch.cuda.synchronize()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(200):
        call()
    prof.disable()
    torch.cuda.synchronize()
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(30)
    from common import RESULTS

    (RESULTS / "short_calls_profile.txt").write_text(text.getvalue())
    print("\n".join(text.getvalue().splitlines()[:45]))


def main() -> None:
    from common import shape_arguments

    ap = shape_arguments("short_calls")
    ap.set_defaults(lengths="1k,2k,4k,8k,16k,32k", kv_heads=8)
    ap.add_argument("--stride", type=int, default=8)
    args = ap.parse_args()
    rows = []
    for length in parse_lengths(args.lengths):
        rows += bench_length(length, args.heads, args.kv_heads, args.head_dim, args.block_size,
                             args.stride)
    cols = ["L", "heads", "variant", "gpu_ms", "host_us", "launches"]
    meta = gpu_info() | {"head_dim": args.head_dim, "block_size": args.block_size,
                         "stride": args.stride, "threshold": 0.9, "dtype": "bfloat16",
                         "causal": True}
    profile_host(parse_lengths(args.lengths)[0], args)
    write_results(args.name, meta, rows, cols,
                  f"Short xattention() calls: host vs device time, H={args.heads}/"
                  f"{args.kv_heads}, D={args.head_dim}, bf16, causal, t=0.9")
    print_table(rows, cols)


if __name__ == "__main__":
    main()
