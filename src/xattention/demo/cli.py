"""The ``demo`` subcommand: its options and the printed report (torch is imported on run only)."""

from __future__ import annotations

import argparse
import math
import os
import sys

from ..cli import _number_type, add_length, positive_int

DEFAULT_OUT = "xattention_demo.png"


_threshold = _number_type("threshold", float, lambda v: v > 0 and math.isfinite(v),
                          "a finite threshold > 0")


def register_cli(subparsers) -> None:
    """Add the ``demo`` subcommand."""
    p = subparsers.add_parser(
        "demo",
        help="compare XAttention with dense attention on synthetic LLM-like attention",
        description="Run dense causal attention and XAttention on seeded, LLM-like Q/K/V "
        "(sinks, local windows, vertical keys, slash lines, topic retrieval, noise); print "
        "density, output error, attention-mass recall and time, and draw the block masks.",
    )
    add_length(p, default=4096, help="tokens (Lq = Lk)", old=("--seq-len",))
    p.add_argument("--heads", type=positive_int, default=8, help="query heads")
    p.add_argument("--kv-heads", type=positive_int, default=2, help="key/value heads (GQA)")
    p.add_argument("--head-dim", type=positive_int, default=64, help="size of each head")
    p.add_argument("--thresholds", type=_threshold, nargs="+", default=[0.9, 0.95],
                   metavar="T", help="XAttention thresholds, one table row each")
    p.add_argument("--stride", type=positive_int, default=8, help="antidiagonal stride")
    p.add_argument("--block-size", type=positive_int, default=128,
                   help="block edge of the sparsity pattern")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic Q/K/V")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto: CUDA when available")
    p.add_argument("--dtype", choices=("auto", "float32", "float16", "bfloat16"),
                   default="auto", help="auto: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--backend", choices=("auto", "torch", "triton"), default="auto",
                   help="XAttention implementation")
    p.add_argument("--repeats", type=positive_int, default=None,
                   help="timed runs per method, median reported (default: 3 on CPU, 10 on CUDA)")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="CPU threads torch uses during the run (default: torch's setting)")
    p.add_argument("--out", default=DEFAULT_OUT, help="PNG to write ('' for none)")
    p.add_argument("--plot-head", type=int, default=0, help="query head shown in the PNG")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    from .run import run_demo

    try:
        result = run_demo(
            seq_len=args.length, heads=args.heads, kv_heads=args.kv_heads,
            head_dim=args.head_dim, thresholds=args.thresholds, stride=args.stride,
            block_size=args.block_size, seed=args.seed, device=args.device, dtype=args.dtype,
            backend=args.backend, repeats=args.repeats, threads=args.threads,
            out=args.out or None, plot_head=args.plot_head,
            progress=False if args.no_progress else None,
        )
    except (ValueError, TypeError) as exc:
        print(f"xattention demo: error: {exc}", file=sys.stderr)
        return 2
    cfg = result.config
    print(f"XAttention demo: B=1, L={cfg['seq_len']}, {cfg['heads']} query / {cfg['kv_heads']} "
          f"KV heads, head_dim {cfg['head_dim']}, causal; stride {cfg['stride']}, block "
          f"{cfg['block_size']}; {cfg['device']}, {cfg['dtype']}, seed {cfg['seed']}"
          + (f", {cfg['threads']} CPU thread(s)" if cfg["device"] == "cpu" else ""))
    print()
    print(result.table())
    print()
    print("density: kept / causally visible blocks. rel_error: ||out - ref|| / ||ref|| against "
          "float32 dense attention.\nrecall: share of the true attention mass inside the kept "
          f"blocks. time_ms: median of {cfg['repeats']} run(s), XAttention's including its "
          "estimate and selection.")
    if cfg["device"] == "cpu":
        print("On CPU XAttention runs its PyTorch path: it computes only the kept blocks, so its "
              "time falls with the density\n(dense SDPA is one fused kernel; below ~1k tokens "
              "the fixed costs of the estimate dominate).")
        _warn_if_oversubscribed(cfg["threads"])
    if result.png is not None:
        print(f"wrote {result.png}")
    elif result.png_skipped_reason:
        print(result.png_skipped_reason)
    return 0


def _warn_if_oversubscribed(threads: int) -> None:
    """On a CPU busier than its core count, OpenMP's default spinning waiters take the cores
    from the threads they wait for: code made of many parallel steps (XAttention's PyTorch path)
    then slows down several times while one fused kernel (dense SDPA) barely does."""
    cores = os.cpu_count() or 1
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    # The CLI makes the waiters passive unless the user chose otherwise (cli._passive_openmp).
    if threads > 1 and load > cores and os.environ.get("OMP_WAIT_POLICY", "").upper() != "PASSIVE":
        print(f"Note: this CPU is oversubscribed (load average {load:.1f} on {cores} cores), "
              "which slows XAttention's many small parallel steps\nmore than dense SDPA's one "
              "kernel; for a fair timing run with OMP_WAIT_POLICY=PASSIVE or --threads 1.")
