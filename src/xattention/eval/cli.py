"""``xattention eval ...``: the RULER-style suite, the attention-fidelity tool and the report.

    xattention eval ruler --model smollm2 --length 2048 4096 --samples 10 \\
        --thresholds 0.8 0.9 0.95 --strides 8 16 --out eval/results/smollm2.jsonl
    xattention eval fidelity --model smollm2 --length 4096 --layers 0 8 16 24 \\
        --out eval/results/fidelity-smollm2
    xattention eval report eval/results/*.jsonl --out eval/results
    xattention eval prepare --model gemma3 --length 8192 16384 --samples 24
"""

from __future__ import annotations

import argparse
from typing import Any

from ..cli import add_length
from .models import MODELS  # no torch or transformers: help stays fast

_DTYPES = ("float32", "bfloat16", "float16")


def register_cli(subparsers: Any) -> None:
    """Add the ``eval`` subcommand (and its ``ruler`` / ``fidelity`` / ``report`` actions)."""
    parser = subparsers.add_parser(
        "eval", help="RULER-style accuracy suite, attention fidelity, result tables",
        description="Evaluate XAttention on real models (full attention vs XAttention).")
    actions = parser.add_subparsers(dest="eval_command", metavar="ACTION")
    parser.set_defaults(func=lambda args: parser.print_help() or 2)

    r = actions.add_parser("ruler", help="run the RULER-style suite")
    r.add_argument("--model", choices=tuple(MODELS), default="smollm2")
    add_length(r, default=[2048, 4096], multiple=True, old=("--lengths",),
               help="prompt lengths in tokens, one or more")
    r.add_argument("--tasks", nargs="+", default=None,
                   help="RULER task names, or 'all', 'default', 'cpu' (default: default)")
    # Defaults in the parsed form: argparse does not pass a list default through `type`.
    r.add_argument("--samples", type=_per_length_arg, nargs="+", default=[(None, 10)],
                   metavar="N|LENGTH=N",
                   help="samples per (task, length): N for every length, LENGTH=N for one "
                        "(e.g. --samples 40 32768=24; default: 10)")
    r.add_argument("--methods", nargs="+", default=None, metavar="SPEC",
                   help="the methods to run, instead of full + --thresholds x --strides: "
                        "full, t0.9-s8, t0.9-s8-b64, t0.9-s8-fp8 (FP8 estimate), "
                        "profile:PATH[=LABEL]")
    r.add_argument("--thresholds", type=float, nargs="+", default=[0.8, 0.9, 0.95])
    r.add_argument("--strides", type=int, nargs="+", default=[8, 16])
    r.add_argument("--block-size", type=int, default=128)
    r.add_argument("--no-full", action="store_true", help="skip the full-attention baseline")
    r.add_argument("--no-grid", action="store_true",
                   help="skip the threshold x stride grid (e.g. to run only --profile methods)")
    r.add_argument("--profile", action="append", default=[], metavar="JSON[=LABEL]",
                   help="also run XAttention with this calibration profile (repeatable); "
                        "LABEL names the method in the results (default: profile-<file stem>)")
    r.add_argument("--batch-size", type=_per_length_arg, nargs="+", default=[(None, 1)],
                   metavar="N|LENGTH=N",
                   help="samples of one task answered together (left-padded; faster on a GPU): "
                        "N for every length, LENGTH=N for one (e.g. --batch-size 8 32768=2; "
                        "default: 1)")
    r.add_argument("--round-samples", type=int, default=None,
                   help="samples per length in one round of the breadth-first order "
                        "(default: the largest batch size)")
    r.add_argument("--max-new-tokens", type=int, default=None,
                   help="cap RULER's per-task generation budget")
    r.add_argument("--seed", type=int, default=42)
    r.add_argument("--device", default="cpu")
    r.add_argument("--dtype", choices=_DTYPES, default="float32")
    r.add_argument("--backend", choices=("auto", "triton", "torch"), default="auto")
    r.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (1 is fastest on a busy machine)")
    r.add_argument("--time-limit", type=float, default=None,
                   help="stop after this many minutes (rerun the same command to resume)")
    r.add_argument("--out", required=True, help="JSONL results file (appended, resumable)")
    r.add_argument("--report", default=None,
                   help="folder to write the Markdown table and charts into when done")
    r.add_argument("--no-progress", action="store_true")
    r.set_defaults(func=_ruler)

    g = actions.add_parser(
        "prepare", help="generate the RULER samples (and save the checked tokenizer) ahead",
        description="Generate the RULER samples of a run into $XATTENTION_CACHE, so that a "
                    "machine without the generators' dependencies (or with a transformers "
                    "release that mis-converts the tokenizer) only reads them.")
    g.add_argument("--model", choices=tuple(MODELS), default="smollm2")
    add_length(g, default=[2048, 4096], multiple=True, old=("--lengths",),
               help="prompt lengths in tokens, one or more")
    g.add_argument("--tasks", nargs="+", default=None)
    g.add_argument("--samples", type=int, default=10)
    g.add_argument("--seed", type=int, default=42)
    g.set_defaults(func=_prepare)

    f = actions.add_parser("fidelity", help="per-head recall / output error / density vs threshold")
    f.add_argument("--model", choices=tuple(MODELS), default="smollm2")
    add_length(f, default=4096, help="prompt length in tokens")
    f.add_argument("--layers", type=int, nargs="+", default=None,
                   help="layer indices (default: 4 spread over the full-attention layers)")
    f.add_argument("--thresholds", type=float, nargs="+", default=None)
    f.add_argument("--stride", type=int, default=8)
    f.add_argument("--block-size", type=int, default=128)
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--device", default="cpu")
    f.add_argument("--dtype", choices=_DTYPES, default="float32")
    f.add_argument("--backend", choices=("auto", "triton", "torch"), default="auto")
    f.add_argument("--threads", type=int, default=None)
    f.add_argument("--out", required=True, help="output prefix: writes PREFIX.json, PREFIX.png")
    f.set_defaults(func=_fidelity)

    p = actions.add_parser("report", help="Markdown table + charts from results JSONL files")
    p.add_argument("results", nargs="+", help="JSONL files written by 'eval ruler'")
    p.add_argument("--out", required=True, help="folder for results.md, summary.json, charts")
    p.add_argument("--fidelity", nargs="*", default=[], help="fidelity JSON files to include")
    p.set_defaults(func=_report)


def _threads(n: int | None) -> None:
    if n:
        import torch

        torch.set_num_threads(n)


def _dtype(name: str) -> Any:
    import torch

    return getattr(torch, name)


def _tasks(names: list[str] | None) -> list[str]:
    from . import ruler

    if not names or names == ["default"]:
        return list(ruler.DEFAULT_TASKS)
    if names == ["all"]:
        return list(ruler.ALL_TASKS)
    if names == ["cpu"]:
        return list(ruler.CPU_TASKS)
    unknown = [t for t in names if t not in ruler.ALL_TASKS]
    if unknown:
        raise SystemExit(f"unknown tasks {unknown}; choose from {list(ruler.ALL_TASKS)}")
    return names


def _per_length_arg(text: str) -> tuple[int | None, int]:
    """``N`` (every length) or ``LENGTH=N`` (one length)."""
    length, sep, n = text.rpartition("=")
    try:
        return (int(length) if sep else None), int(n)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or LENGTH=N, got {text!r}") from None


def _per_length(items: list[tuple[int | None, int]], lengths: list[int]) -> dict[int, int]:
    default = dict(items).get(None)
    table = {n: default for n in lengths if default is not None}
    table.update({length: n for length, n in items if length is not None})
    missing = [n for n in lengths if n not in table]
    if missing:
        raise SystemExit(f"no value for lengths {missing}: give N (all) or LENGTH=N")
    return table


def _ruler(args: argparse.Namespace) -> int:
    from .runner import Method, parse_methods, run_suite

    _threads(args.threads)
    if args.methods is not None:
        try:
            methods = [Method.parse(spec) for spec in args.methods]
        except ValueError as exc:
            raise SystemExit(f"--methods: {exc}") from None
    else:
        methods = parse_methods([] if args.no_grid else args.thresholds, args.strides,
                                args.block_size, include_full=not args.no_full)
    for item in args.profile:
        path, _, label = item.partition("=")
        methods.append(Method.from_profile(path, label or None))
    if not methods:
        raise SystemExit("nothing to run: --no-full and --no-grid without --profile")
    run_suite(args.model, args.length, _tasks(args.tasks), methods,
              num_samples=_per_length(args.samples, args.length),
              seed=args.seed, out=args.out, device=args.device, dtype=_dtype(args.dtype),
              backend=args.backend, max_new_tokens=args.max_new_tokens,
              progress=not args.no_progress,
              batch_size=_per_length(args.batch_size, args.length),
              round_samples=args.round_samples,
              time_limit_s=None if args.time_limit is None else args.time_limit * 60)
    if args.report:
        from .report import write_report

        write_report([args.out], args.report)
    return 0


def _prepare(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from . import ruler
    from .models import MODELS, load_tokenizer

    tokenizer = load_tokenizer(args.model)
    jobs = [(length, task) for length in args.length for task in _tasks(args.tasks)]
    for length, task in tqdm(jobs, desc=f"{args.model} RULER samples"):
        ruler.generate_samples(task, length, args.samples, tokenizer, seed=args.seed,
                               chat=MODELS[args.model].chat)
    return 0


def _fidelity(args: argparse.Namespace) -> int:
    from .fidelity import run_fidelity

    _threads(args.threads)
    run_fidelity(args.model, length=args.length, layers=args.layers, thresholds=args.thresholds,
                 stride=args.stride, block_size=args.block_size, seed=args.seed,
                 device=args.device, dtype=_dtype(args.dtype), backend=args.backend,
                 out=args.out)
    return 0


def _report(args: argparse.Namespace) -> int:
    from .report import write_report

    write_report(args.results, args.out, fidelity=args.fidelity)
    return 0
