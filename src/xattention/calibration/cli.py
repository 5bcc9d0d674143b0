"""``xattention calibrate``: per-head threshold calibration from the command line.

Example::

    # retrieval windows (the default): 32 needle prompts calibrate, 32 others verify; budget:
    # the answer-token KL of uniform 0.9 (this is how eval/results/h200/ profiles were made)
    xattention calibrate --model smollm2 --calib-windows 32 --heldout-windows 32 \\
        --reference-threshold 0.9 --out smollm2_profile.json

    # prose windows of the haystack, KL on their last 1024 tokens
    xattention calibrate --model smollm2 --data prose --length 4096 --calib-windows 2 \\
        --heldout-windows 1 --out smollm2_prose_profile.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from typing import Any

from ..cli import add_length, non_negative_int, positive_float, positive_int


def register_cli(subparsers: Any) -> None:
    """Add the ``calibrate`` subcommand to an ``argparse`` subparsers object."""
    p = subparsers.add_parser(
        "calibrate",
        help="calibrate per-head XAttention thresholds for a model",
        description="Measure per-(layer, head) density/recall curves on calibration text, choose "
                    "per-head thresholds that minimise density under an accuracy budget, verify "
                    "on held-out text and write a JSON threshold profile.",
    )
    p.add_argument("--model", required=True,
                   help="a model of xattention.eval.models (smollm2, gemma3, "
                        "qwen2.5-1.5b, qwen2.5-0.5b), a model directory, or a .gguf file")
    p.add_argument("--out", required=True, help="where to write the profile (JSON)")
    p.add_argument("--data", choices=("prose", "retrieval"), default=None,
                   help="retrieval: RULER-style needle prompts with their answers, KL and "
                        "curves on the answer tokens; prose: windows of running text, KL on "
                        "their last --eval-tokens (default: prose with --text or --heldout-text, "
                        "else retrieval)")
    p.add_argument("--tasks", nargs="+", default=None,
                   help="RULER tasks of the retrieval windows (default: the NIAH family and vt)")
    p.add_argument("--text", action="append", default=None, metavar="FILE",
                   help="calibration text file (repeatable); default: the Paul Graham haystack")
    p.add_argument("--heldout-text", action="append", default=None, metavar="FILE",
                   help="held-out text file (repeatable); default: other windows of --text")
    p.add_argument("--stride", type=positive_int, default=8,
                   help="antidiagonal stride of the estimate (divides --block-size)")
    p.add_argument("--block-size", type=positive_int, default=128,
                   help="block edge of the sparsity pattern")
    add_length(p, default=4096, old=("--seq-len",),
               help="tokens per window (retrieval: the prompt length of the tasks)")
    p.add_argument("--calib-windows", type=positive_int, default=None,
                   help="windows to calibrate on (default: 2 prose / 16 retrieval)")
    p.add_argument("--heldout-windows", type=positive_int, default=None,
                   help="windows to verify on (default: 1 prose / 16 retrieval)")
    p.add_argument("--eval-tokens", type=positive_int, default=1024,
                   help="prose only: held-out KL/loss over the last this-many positions")
    g = p.add_argument_group("budget")
    g.add_argument("--min-recall", type=positive_float, default=0.8,
                   help="per-head floor on the recall of true attention mass")
    g.add_argument("--max-kl", type=positive_float, default=None,
                   help="bound on held-out mean KL(dense||sparse) per token, nats")
    g.add_argument("--max-loss-increase", type=float, default=None,
                   help="bound on the held-out next-token loss increase, nats")
    g.add_argument("--reference-threshold", type=positive_float, default=0.9,
                   help="without --max-kl/--max-loss-increase: bound the held-out KL by what "
                        "this uniform threshold achieves")
    g.add_argument("--proxy", choices=("output_error", "lost_mass"), default="output_error",
                   help="per-head cost the allocation trades against density: the attention "
                        "output's error or the attention mass left out")
    g.add_argument("--proxy-budget", type=positive_float, default=None,
                   help="fix the summed proxy budget instead of searching it")
    p.add_argument("--grid", default=None,
                   help="comma-separated thresholds to consider (default: 1.0, 0.995 ... 0.92, "
                        "then 0.9 * 0.9**s down to 0.28)")
    p.add_argument("--grid-ratio", type=positive_float, default=None,
                   help="use the geometric grid --grid-start * ratio**s instead (paper: 0.9)")
    p.add_argument("--grid-start", type=positive_float, default=1.0,
                   help="first threshold of the --grid-ratio grid")
    p.add_argument("--grid-steps", type=positive_int, default=13,
                   help="thresholds in the --grid-ratio grid")
    p.add_argument("--method", choices=("dp", "lagrangian"), default="dp",
                   help="allocation under a budget: exact dynamic programme or Lagrangian "
                        "relaxation")
    p.add_argument("--ladder", type=positive_int, default=24,
                   help="budgets on the geometric ladder the held-out search bisects")
    p.add_argument("--refine", type=non_negative_int, default=2,
                   help="extra bisection probes after the ladder search")
    p.add_argument("--layers", default=None,
                   help="comma-separated layers to calibrate (others stay dense)")
    p.add_argument("--seed", type=int, default=0,
                   help="window choice / retrieval generator seed (keep it apart from the "
                        "evaluation's 42)")
    p.add_argument("--backend", default="auto", choices=("auto", "triton", "torch"),
                   help="XAttention implementation (see xattention.xattention)")
    p.add_argument("--device", default=None, help="e.g. cuda; default: where the model loads")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    p.add_argument("--verbose", action="store_true",
                   help="print the profile's measurements (JSON) when done")
    p.set_defaults(func=_main)


def check_model_name(name: str) -> None:
    """A known model name, a model directory or a ``.gguf`` file; anything else is a ValueError
    listing the known models (not a hub id: the hub would be retried for a minute, offline, and
    a typo such as ``smolm2`` would end in a long traceback)."""
    from ..eval.models import MODELS

    if name in MODELS or os.path.isdir(name) or (name.endswith(".gguf") and os.path.isfile(name)):
        return
    what = "no such .gguf file" if name.endswith(".gguf") else "not a known model or a directory"
    raise ValueError(f"--model {name!r}: {what}; known models: {', '.join(sorted(MODELS))} (or "
                     "a model directory, or a .gguf file)")


def load_model_and_tokenizer(name: str, device: str | None = None) -> tuple[Any, Any, str]:
    """Load a model of ``xattention.eval.models.MODELS`` by name, or a local path."""
    import torch

    from ..eval.models import MODELS

    check_model_name(name)
    if name in MODELS:
        from ..eval.models import load_model

        model, tok = load_model(name)
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if name.endswith(".gguf"):
            folder, file = os.path.split(os.path.abspath(name))
            tok = AutoTokenizer.from_pretrained(folder, gguf_file=file)
            model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file,
                                                         dtype=torch.float32)
        else:
            tok = AutoTokenizer.from_pretrained(name)
            model = AutoModelForCausalLM.from_pretrained(name)
    if device is not None:
        model = model.to(device)
    model.eval()
    return model, tok, name


def _read(paths: list[str] | None) -> list[str] | None:
    if not paths:
        return None
    out = []
    for path in paths:
        with open(path, encoding="utf-8") as f:
            out.append(f.read())
    return out


def _numbers(text: str | None, kind: type, what: str) -> list[Any] | None:
    if text is None:
        return None
    try:
        return [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"--{what} must be comma-separated numbers, got {text!r}") from None


def _main(args: argparse.Namespace) -> int:
    from .config import CalibrationConfig, threshold_grid
    from .run import calibrate

    grid = _numbers(args.grid, float, "grid")
    if grid is None and args.grid_ratio is not None:
        grid = threshold_grid(args.grid_start, args.grid_ratio, args.grid_steps)
    chat = None
    from ..eval.models import MODELS

    if args.model in MODELS:  # prompt them as the evaluation does
        chat = MODELS[args.model].chat
    try:
        config = CalibrationConfig(
            data=args.data, tasks=args.tasks, chat=chat, stride=args.stride,
            block_size=args.block_size, seq_len=args.length, calib_windows=args.calib_windows,
            heldout_windows=args.heldout_windows, eval_tokens=args.eval_tokens,
            min_recall=args.min_recall, max_kl=args.max_kl,
            max_loss_increase=args.max_loss_increase,
            reference_threshold=args.reference_threshold, proxy=args.proxy,
            proxy_budget=args.proxy_budget, grid=grid, method=args.method, ladder=args.ladder,
            refine=args.refine, layers=_numbers(args.layers, int, "layers"),
            model_id=args.model, seed=args.seed, backend=args.backend,
            progress=not args.no_progress)
        check_model_name(args.model)
    except (TypeError, ValueError) as exc:  # checked before minutes of model loading
        raise SystemExit(f"xattention calibrate: error: {exc}") from None
    model, tok, _ = load_model_and_tokenizer(args.model, args.device)
    with warnings.catch_warnings():
        # The profile's warnings are printed once below, as a line of the report; the Python
        # warning (with its source line) is for library callers.
        warnings.simplefilter("ignore", RuntimeWarning)
        profile = calibrate(model, tok, _read(args.text), config,
                            heldout_texts=_read(args.heldout_text))
    profile.save(args.out)
    summary = {k: v for k, v in profile.measured.items() if k != "per_layer_calib"}
    if args.verbose:
        print(json.dumps(summary, indent=1, default=str))
    if summary.get("warnings"):
        print(("WARNING: this profile is degenerate: " if summary.get("degenerate") else
               "WARNING: ") + "; ".join(summary["warnings"]), file=sys.stderr)
    density = summary.get("heldout_density", summary.get("density"))
    print(f"wrote {args.out}" + (f" (held-out density {density:.3f})"
                                 if isinstance(density, float) else ""))
    return 0
