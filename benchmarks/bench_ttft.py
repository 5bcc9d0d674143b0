"""Time to first token of a whole model through transformers: dense SDPA vs XAttention.

Run on a CUDA GPU (the model loads from its GGUF, see ``xattention.eval.models``):

    python benchmarks/bench_ttft.py --model qwen2.5-1.5b --lengths 8k,16k,32k \\
        --methods full t0.9-s8 t0.95-s8 t0.9-s16 t0.9-s8-fp8 --layers 0,9,18,27

The prompt is the first ``L`` tokens of RULER's essay haystack, batch 1. Time to first token is
one prefill forward (``logits_to_keep=1``) plus the argmax of the next token, synchronised, the
median of ``--runs`` runs after two warm-ups (the first call of a shape tunes the kernels).

Dense rows: SDPA as transformers calls it (``sdpa``: torch's default priority, flash first) and
with cuDNN moved first (``sdpa-cudnn``). The attention share comes from one more run in which
CUDA events bracket every attention call; it says how much of the prefill sparsity can touch
(the Amdahl ceiling of the speed-up is ``1 / (1 - share)``). XAttention rows carry the measured
block density, per layer and overall (one more run with the statistics on; the timed runs keep
them off, so no host sync is timed).

``--layers`` also times single layers: the post-RoPE Q/K/V of those layers at each length, and
``xattention()`` forced sparse on them against cuDNN (``bench_xattention.time_xattention``), eager
and replayed from a CUDA graph (``--no-layer-graph``: eager only; ``--layers-only``: no TTFT).
Results: ``results/<name>.{json,md}`` (and ``<name>_layers``), written after every length.
"""

from __future__ import annotations

import contextlib
import statistics
import time

import torch
from common import gpu_info, parse_lengths, print_table, write_results


def essay_ids(tokenizer, length: int) -> torch.Tensor:
    from xattention.eval.ruler import load_haystack

    ids = tokenizer(load_haystack(), return_tensors="pt", add_special_tokens=False).input_ids
    if ids.shape[1] < length:
        reps = -(-length // ids.shape[1])
        ids = ids.repeat(1, reps)
    return ids[:, :length]


@contextlib.contextmanager
def sdpa_priority(cudnn_first: bool):
    """cuDNN first in SDPA's backend order (or the order as it is)."""
    from xattention.kernels.dense import _prefer_cudnn

    previous = _prefer_cudnn() if cudnn_first else None
    try:
        yield
    finally:
        if previous is not None:
            torch._C._set_sdp_priority_order(previous)


@contextlib.contextmanager
def timed_attention(model, events: list):
    """Bracket every call of the model's attention function with a pair of CUDA events."""
    from transformers import AttentionInterface

    from xattention.integrations.transformers.registration import implementation

    name = implementation(model)
    table = AttentionInterface._global_mapping
    inner = table[name]

    def wrapper(*args, **kwargs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = inner(*args, **kwargs)
        end.record()
        events.append((start, end))
        return out

    table[name] = wrapper
    try:
        yield
    finally:
        table[name] = inner


def prefill(model, ids: torch.Tensor) -> float:
    """Milliseconds from the call to the first token on the host."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
    int(out.logits[0, -1].argmax())  # the first token, on the host
    return (time.perf_counter() - t0) * 1e3


def ttft(model, ids, runs: int) -> dict:
    for _ in range(2):
        prefill(model, ids)
    times = [prefill(model, ids) for _ in range(runs)]
    events: list = []
    with timed_attention(model, events):
        total = prefill(model, ids)
    attention = sum(s.elapsed_time(e) for s, e in events)
    return {"ttft_ms": statistics.median(times), "ttft_min_ms": min(times),
            "attention_ms": attention, "attention_share": attention / total}


def bench_model(model, tokenizer, length: int, methods, runs: int,
                cuda_graphs: bool = False) -> list[dict]:
    from xattention.eval.runner import _ESTIMATE_DTYPES
    from xattention.integrations import transformers as xt

    ids = essay_ids(tokenizer, length).to(model.device)
    rows = []
    dense_ms = None
    for method in methods:
        label = method.name
        if method.is_full:
            for cudnn in (False, True):
                with sdpa_priority(cudnn):
                    row = {"L": length, "method": "sdpa-cudnn" if cudnn else "sdpa",
                           "density": 1.0} | ttft(model, ids, runs)
                if cudnn:
                    dense_ms = row["ttft_ms"]
                rows.append(row)
            continue
        kwargs = dict(threshold=method.threshold, stride=method.stride,
                      block_size=method.block_size, backend="triton",
                      estimate_dtype=_ESTIMATE_DTYPES[method.estimate_dtype])
        xt.enable(model, record_stats=False, **kwargs)
        try:
            row = {"L": length, "method": label} | ttft(model, ids, runs)
        finally:
            xt.disable(model)
        graph_row = None
        if cuda_graphs:  # the same, every layer's sparse call replayed (the warm-ups capture)
            xt.enable(model, record_stats=False, cuda_graphs=True, **kwargs)
            try:
                graph_row = {"L": length, "method": label + "+graph"} | ttft(model, ids, runs)
            finally:
                xt.disable(model)
        xt.enable(model, record_stats=True, **kwargs)
        try:
            xt.reset_stats(model)
            with torch.no_grad():
                model(input_ids=ids, use_cache=True, logits_to_keep=1)
            stats = xt.last_stats(model)
            row["density"] = stats.overall()
            row["layer_density"] = {str(k): round(v, 4) for k, v in stats.per_layer().items()}
        finally:
            xt.disable(model)
        rows.append(row)
        if graph_row is not None:
            rows.append(graph_row | {"density": row["density"]})
    for row in rows:
        if dense_ms is not None:
            row["speedup_vs_cudnn"] = dense_ms / row["ttft_ms"]
    return rows


def bench_layers(model, tokenizer, length: int, layers: list[int], args) -> list[dict]:
    """Single layers: captured Q/K/V, xattention() forced sparse vs cuDNN."""
    import bench_xattention as bx

    from xattention.eval.runner import _ESTIMATE_DTYPES, Method
    from xattention.integrations.transformers import capture_attention_inputs

    ids = essay_ids(tokenizer, length).to(model.device)
    caps = capture_attention_inputs(model, ids, layers=layers, logits_to_keep=1)
    rows = []
    for layer in layers:
        q, k, v = (t.to(torch.bfloat16).contiguous() for t in caps[layer])
        cudnn_ms, flash_ms, ref = bx.dense_reference(q, k, v)
        base = {"layer": layer, "L": length}
        rows.append(base | {"method": "sdpa_cudnn", "ms": cudnn_ms})
        rows.append(base | {"method": "sdpa_flash", "ms": flash_ms,
                            "speedup_vs_cudnn": cudnn_ms / flash_ms})
        for spec in args.layer_methods:
            m = Method.parse(spec)
            rows.append(base | {"method": m.name}
                        | bx.time_xattention(q, k, v, ref, m.threshold, m.stride, m.block_size,
                                             cudnn_ms, graph=args.layer_graph,
                                             estimate_dtype=_ESTIMATE_DTYPES[m.estimate_dtype]))
    del caps
    torch.cuda.empty_cache()
    return rows


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    ap.add_argument("--model", default="qwen2.5-1.5b")
    ap.add_argument("--lengths", default="8k,16k,32k")
    ap.add_argument("--methods", nargs="+",
                    default=["full", "t0.9-s8", "t0.95-s8", "t0.9-s16", "t0.9-s8-fp8"],
                    help="method specs as in `xattention eval ruler --methods`")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--layers", default="", help="also time these layers alone, e.g. 0,9,18,27")
    ap.add_argument("--layer-methods", nargs="+", default=["t0.9-s8", "t0.9-s16"])
    ap.add_argument("--no-layer-graph", dest="layer_graph", action="store_false",
                    help="time single layers eagerly only (default: also replayed from a CUDA "
                         "graph, XAttentionGraph)")
    ap.add_argument("--cuda-graphs", action="store_true",
                    help="also time each XAttention method with xt.enable(cuda_graphs=True)")
    ap.add_argument("--layers-only", action="store_true",
                    help="skip the whole-model time to first token (single layers only)")
    ap.add_argument("--name", default="ttft_qwen15b")
    ap.add_argument("--layers-name", default=None,
                    help="results name of the single-layer table (default: <name>_layers)")
    args = ap.parse_args()

    from xattention.eval.models import load_model
    from xattention.eval.runner import Method

    methods = [Method.parse(m) for m in args.methods]
    t0 = time.time()
    model, tokenizer = load_model(args.model, device="cuda", dtype=torch.bfloat16)
    print(f"loaded {args.model} in {time.time() - t0:.0f} s", flush=True)
    meta = gpu_info() | {"model": args.model, "batch": 1, "dtype": "bfloat16",
                         "prompt": "RULER essay haystack", "runs": args.runs,
                         "backend": "triton (sparse stage: Triton kernel)"}
    rows, layer_rows = [], []
    layers = [int(x) for x in args.layers.split(",") if x]
    cols = ["L", "method", "ttft_ms", "speedup_vs_cudnn", "attention_share", "density"]
    layer_cols = ["layer", "L", "method", "ms", "graph_ms", "density", "speedup_vs_cudnn",
                  "graph_vs_cudnn", "rel_err"]
    with torch.no_grad():
        for length in parse_lengths(args.lengths):
            if not args.layers_only:
                rows += bench_model(model, tokenizer, length, methods, args.runs,
                                    cuda_graphs=args.cuda_graphs)
                write_results(args.name, meta, rows, cols,
                              f"Time to first token, {args.model}, transformers, B=1, bf16")
                print_table([r for r in rows if r["L"] == length], cols)
            if layers:
                layer_rows += bench_layers(model, tokenizer, length, layers, args)
                write_results(args.layers_name or args.name + "_layers", meta, layer_rows,
                              layer_cols,
                              f"Single {args.model} layers: xattention() forced sparse vs "
                              "cuDNN, captured Q/K/V, bf16, causal")
            torch.cuda.empty_cache()
    if rows:
        print_table(rows, cols)
    if layer_rows:
        print_table(layer_rows, layer_cols)


if __name__ == "__main__":
    main()
