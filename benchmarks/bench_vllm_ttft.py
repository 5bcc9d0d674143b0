"""Time to first token through vLLM's V1 engine: the stock backends vs XAttention (``CUSTOM``).

Run on a CUDA GPU with vLLM installed (``eval/gpu/vllm_cuda.sh ttft`` does it on the lent card):

    python benchmarks/bench_vllm_ttft.py --model DIR --lengths 8k,16k,32k \\
        --backends FLASH_ATTN TRITON_ATTN t0.95 t0.9

Each backend is one engine, started in a subprocess of its own (its GPU memory is freed when it
exits; the XAttention settings are environment variables read at engine start). A request is
``L`` tokens of RULER's essay haystack, a different offset per request, prefix caching off and
``max_num_batched_tokens >= L`` so the prompt is prefilled in one step; its time to first token is
the wall time of ``LLM.generate`` with ``max_tokens=1`` (prefill, one sampled token, the engine's
own overhead), the median of ``--runs`` requests after two warm-ups. Both sides run eagerly
(``enforce_eager``: vLLM's CUDA graphs cover decode batches, not a 32k prefill). ``tNN`` rows are
XAttention at threshold ``0.NN`` (stride 8, block 128) with its statistics on; their density is
the engine's own count (``read_stats``) over the timed requests.

Results: ``results/<name>.{json,md}``, rewritten after every backend.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from common import gpu_info, parse_lengths, print_table, write_results

STOCK = ("FLASH_ATTN", "TRITON_ATTN", "FLEX_ATTENTION", "FLASHINFER")


def _threshold(backend: str) -> float | None:
    """``t0.95`` -> 0.95; a stock backend's name -> None."""
    if backend in STOCK:
        return None
    if not backend.startswith("t"):
        raise ValueError(f"backend must be one of {STOCK} or tTHRESHOLD (e.g. t0.95), got "
                         f"{backend!r}")
    return float(backend[1:])


def prompts(tokenizer, length: int, count: int) -> list[list[int]]:
    """``count`` prompts of ``length`` essay tokens (the transformers table's prompt,
    ``bench_ttft.essay_ids``), each from another offset (no shared prefix)."""
    from bench_ttft import essay_ids

    ids = essay_ids(tokenizer, length + 97 * count)[0].tolist()
    return [ids[97 * i:97 * i + length] for i in range(count)]


def one_engine(args, backend: str) -> list[dict]:
    """Runs in the subprocess: one engine, every length."""
    from vllm import LLM, SamplingParams

    threshold = _threshold(backend)
    stats_dir = None
    if threshold is not None:
        stats_dir = tempfile.mkdtemp(prefix="xa-ttft-")
        os.environ.update(XATTENTION_THRESHOLD=str(threshold), XATTENTION_STATS_DIR=stats_dir)
    lengths = parse_lengths(args.lengths)
    # A 32k prompt plus its first token is one position past Qwen2.5's 32768: let vLLM allow the
    # 64 extra positions rather than time 64 tokens less than the transformers table.
    os.environ.setdefault("VLLM_ALLOW_LONG_MAX_MODEL_LEN", "1")
    t0 = time.time()
    llm = LLM(model=args.model, attention_backend="CUSTOM" if threshold is not None else backend,
              dtype="bfloat16", enforce_eager=True, enable_prefix_caching=False,
              max_model_len=max(lengths) + 64, max_num_batched_tokens=max(lengths) + 64,
              gpu_memory_utilization=args.gpu_memory_utilization, seed=0)
    print(f"== {backend}: engine up in {time.time() - t0:.0f} s", flush=True)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    params = SamplingParams(max_tokens=1, temperature=0.0)
    rows = []
    for length in lengths:
        reqs = prompts(tokenizer, length, args.runs + 2)
        times, first = [], []
        for i, ids in enumerate(reqs):
            start = time.perf_counter()
            out = llm.generate([{"prompt_token_ids": ids}], params, use_tqdm=False)
            if i >= 2:  # two warm-ups: the first call of a shape tunes the kernels
                times.append(1e3 * (time.perf_counter() - start))
            first.append(out[0].outputs[0].token_ids[0])
        row = {"L": length, "backend": backend, "ttft_ms": statistics.median(times),
               "runs": len(times), "first_tokens": first}
        if stats_dir is not None:
            from xattention.integrations.vllm import read_stats

            row["threshold"] = threshold
            row["density"] = read_stats(stats_dir)[0]["overall"]  # since start: every length so far
        rows.append(row)
        print(f"== {backend} L={length}: {row['ttft_ms']:.1f} ms", flush=True)
    return rows


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    ap.add_argument("--model", required=True, help="a safetensors model directory vLLM loads")
    ap.add_argument("--lengths", default="8k,16k,32k")
    ap.add_argument("--backends", nargs="+", default=["FLASH_ATTN", "TRITON_ATTN", "t0.95", "t0.9"],
                    help=f"stock backends ({', '.join(STOCK)}) and XAttention thresholds (t0.95)")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.5)
    ap.add_argument("--name", default="vllm_ttft")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # the subprocess: this backend only
    args = ap.parse_args()
    for b in args.backends:
        _threshold(b)  # a bad name fails here, before any engine starts
    if args.one:
        print("ROWS " + json.dumps(one_engine(args, args.one)), flush=True)
        return
    meta = gpu_info() | {"model": args.model, "batch": 1, "dtype": "bfloat16", "runs": args.runs,
                         "engine": "vLLM V1, offline LLM.generate(max_tokens=1), eager"}
    try:
        import vllm

        meta["vllm"] = vllm.__version__
    except ImportError:
        pass
    rows: list[dict] = []
    cols = ["L", "backend", "ttft_ms", "vs_flash_attn", "density"]
    for backend in args.backends:
        cmd = [sys.executable, __file__, *sys.argv[1:], "--one", backend]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("ROWS ")]
        if proc.returncode or not lines:
            print(f"== {backend} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}",
                  flush=True)
            continue
        rows += json.loads(lines[-1][5:])
        flash = {r["L"]: r["ttft_ms"] for r in rows if r["backend"] == "FLASH_ATTN"}
        for r in rows:
            if r["L"] in flash:
                r["vs_flash_attn"] = flash[r["L"]] / r["ttft_ms"]
        write_results(args.name, meta, rows, cols,
                      "Time to first token through vLLM's V1 engine, B=1, bf16")
        print_table([r for r in rows if r["backend"] == backend], cols)
    print_table(rows, cols)


if __name__ == "__main__":
    main()
