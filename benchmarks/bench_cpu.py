"""CPU benchmark: the PyTorch block-sparse path and the whole ``xattention()`` against dense SDPA.

Everything runs in one process on the same inputs (the package's structured generator, B=1,
causal), methods interleaved within every repeat so that a load change on a shared machine hits
all of them alike; medians are reported, with the speed-up over dense SDPA next to each time.

* ``sparse``: ``block_sparse_attention(backend="torch")`` on random block masks that keep a given
  share of the causal blocks (plus the forced sink and diagonal);
* ``xattention``: estimate + selection + sparse attention at a threshold (its density reported);
* ``--memory``: peak resident memory of the torch estimate and sparse path at long lengths
  (B=1, 2 heads, D=64), read as the kernel's high-water mark (``VmHWM``, reset through
  ``/proc/self/clear_refs`` before each call, after ``malloc_trim`` returned the free heap) minus
  the resident size before it: it includes the output and every temporary, whatever allocator
  served them (Linux, glibc). tracemalloc would not see torch's allocations.

Writes ``results/cpu.json`` and ``results/cpu.md`` (machine, threads and load average named).
On a machine shared with other jobs, set ``OMP_WAIT_POLICY=PASSIVE``: OpenMP's default spinning
waiters then steal the cores from the threads they wait for, and code made of many parallel
regions (the sparse path, the estimate) slows down several times while one fused kernel (dense
SDPA) does not.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_cpu.py --memory
"""

from __future__ import annotations

import argparse
import ctypes
import datetime as _dt
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from xattention import block_density, block_sparse_attention, estimate_block_scores, xattention
from xattention.block_layout import candidate_blocks, forced_blocks
from xattention.synthetic import structured_qkv

RESULTS = Path(os.environ.get("XATTENTION_BENCH_OUT", Path(__file__).parent / "results"))


def machine() -> dict:
    model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                  if line.startswith("model name")), platform.processor() or "unknown")
    return {"cpu": model, "cores": os.cpu_count(), "threads": torch.get_num_threads(),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(unset)"),
            "torch": torch.__version__, "python": platform.python_version(),
            "load_avg_1min": round(os.getloadavg()[0], 2),
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}


def random_mask(heads: int, length: int, block_size: int, density: float, seed: int):
    """Random kept blocks at ``density`` of the causal candidates, the forced ones included."""
    cand = candidate_blocks(length, length, block_size, True)
    forced = forced_blocks(length, length, block_size, True)
    gen = torch.Generator().manual_seed(seed)
    n_cand, n_forced = cand.sum(-1), forced.sum(-1)
    want = (density * n_cand - n_forced).clamp(min=0)
    p = (want / (n_cand - n_forced).clamp(min=1)).clamp(max=1)
    rnd = torch.rand(1, heads, *cand.shape, generator=gen)
    return ((rnd < p[:, None]) & cand) | forced


def median_ms(times: list[float]) -> float:
    times = sorted(times)
    return times[len(times) // 2] * 1e3


def bench_speed(args) -> list[dict]:
    rows = []
    for length in args.lengths:
        q, k, v, _ = structured_qkv(1, args.heads, args.kv_heads, length, head_dim=args.head_dim)
        group = args.heads // args.kv_heads
        kr, vr = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
        methods = {("dense (SDPA)", None): lambda: F.scaled_dot_product_attention(
            q, kr, vr, is_causal=True)}
        densities = {}
        for d in args.densities:
            mask = random_mask(args.heads, length, args.block_size, d, seed=length)
            densities[("sparse", d)] = block_density(mask, length, length, args.block_size)[
                "overall"]
            methods[("sparse", d)] = (lambda m=mask: block_sparse_attention(
                q, k, v, m, block_size=args.block_size, backend="torch"))
        for t in args.thresholds:
            methods[("xattention", t)] = (lambda t=t: xattention(
                q, k, v, threshold=t, stride=args.stride, block_size=args.block_size,
                backend="torch", return_mask=True))
        times = {key: [] for key in methods}
        outputs = {}
        for rep in tqdm(range(args.repeats + 1), desc=f"L={length}", leave=False):
            for key, fn in methods.items():
                t0 = time.perf_counter()
                result = fn()
                if rep:  # the first round warms up
                    times[key].append(time.perf_counter() - t0)
                outputs[key] = result
        dense = outputs[("dense (SDPA)", None)]
        dense_ms = median_ms(times[("dense (SDPA)", None)])
        for (method, param), ts in times.items():
            ms = median_ms(ts)
            row = {"length": length, "method": method, "ms": round(ms, 1),
                   "speedup_vs_dense": round(dense_ms / ms, 2)}
            if method == "sparse":
                row["target_density"] = param
                row["density"] = round(densities[(method, param)], 3)
            elif method == "xattention":
                out, mask = outputs[(method, param)]
                row["threshold"] = param
                row["density"] = round(block_density(mask, length, length,
                                                     args.block_size)["overall"], 3)
                row["rel_error"] = float(f"{((out - dense).norm() / dense.norm()).item():.3g}")
            else:
                row["density"] = 1.0
            rows.append(row)
        all_kept = outputs.get(("sparse", 1.0))
        if all_kept is not None:  # every block kept is dense attention: a sanity check
            err = (all_kept - dense).abs().max().item()
            if err > 1e-4:
                raise RuntimeError(f"sparse path with every block kept differs from SDPA by {err}")
    return rows


def _peak_rss_bytes(fn) -> int:
    """Resident high-water mark during ``fn()`` above the resident size before it (Linux)."""

    def status(field: str) -> int:
        with open("/proc/self/status") as f:
            line = next(x for x in f if x.startswith(field))
        return int(line.split()[1]) * 1024

    # Hand free heap pages back first: reused resident pages would not raise the high-water mark.
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current resident size
    before = status("VmRSS:")
    result = fn()
    peak = status("VmHWM:") - before
    del result
    return peak


def bench_memory(args) -> list[dict]:
    rows = []
    for length in tqdm(args.memory_lengths, desc="memory", leave=False):
        q, k, v, _ = structured_qkv(1, 2, 2, length, head_dim=64)
        mask = random_mask(2, length, args.block_size, 0.1, seed=length)
        inputs = 3 * q.numel() * q.element_size()
        est = _peak_rss_bytes(lambda: estimate_block_scores(
            q, k, stride=args.stride, block_size=args.block_size, backend="torch"))
        sparse = _peak_rss_bytes(lambda: block_sparse_attention(
            q, k, v, mask, block_size=args.block_size, backend="torch"))
        rows.append({"length": length, "inputs_MiB": round(inputs / 2**20, 1),
                     "estimate_peak_MiB": round(est / 2**20, 1),
                     "sparse_peak_MiB": round(sparse / 2**20, 1)})
    return rows


def write(name: str, meta: dict, speed: list[dict], memory: list[dict]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps({"meta": meta, "speed": speed,
                                                  "memory": memory}, indent=2) + "\n")
    lines = ["# CPU: PyTorch block-sparse path and xattention() vs dense SDPA", "",
             f"CPU: {meta['cpu']}, {meta['cores']} cores, {meta['threads']} torch thread(s), "
             f"OMP_WAIT_POLICY {meta['omp_wait_policy']}; "
             f"torch {meta['torch']}; load average {meta['load_avg_1min']} at the start; "
             f"{meta['date']}.", "",
             f"B=1, {meta['heads']} query / {meta['kv_heads']} KV heads, D={meta['head_dim']}, "
             f"causal, float32, block {meta['block_size']}, stride {meta['stride']}; structured "
             f"inputs; median of {meta['repeats']} interleaved runs after one warm-up. speed-up = "
             "dense SDPA time / this time.", ""]
    if meta.get("note"):
        lines += [meta["note"], ""]
    lines += ["| length | method | threshold / target density | density | ms | speed-up vs dense |",
              "|---|---|---|---|---|---|"]
    for r in speed:
        param = r.get("threshold", r.get("target_density", "-"))
        lines.append(f"| {r['length']} | {r['method']} | {param} | "
                     f"{r['density']:.3f} | {r['ms']:.1f} | {r['speedup_vs_dense']:.2f}x |")
    if memory:
        lines += ["", "Peak resident memory above the inputs (B=1, 2 heads, D=64, float32; sparse "
                  "at 10% density), output included:", "",
                  "| length | q+k+v MiB | estimate peak MiB | sparse peak MiB |",
                  "|---|---|---|---|"]
        for r in memory:
            lines.append(f"| {r['length']} | {r['inputs_MiB']} | {r['estimate_peak_MiB']} | "
                         f"{r['sparse_peak_MiB']} |")
    path = RESULTS / f"{name}.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def _ints(text: str) -> list[int]:
    return [int(float(x[:-1]) * 1024) if x.lower().endswith("k") else int(x)
            for x in text.split(",")]


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lengths", type=_ints, default=_ints("2k,4k,8k,16k"))
    ap.add_argument("--densities", type=_floats, default=_floats("0.1,0.2,0.3,1.0"))
    ap.add_argument("--thresholds", type=_floats, default=_floats("0.9,0.95"))
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--block-size", type=int, default=128)
    ap.add_argument("--stride", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--memory", action="store_true", help="also measure peak memory")
    ap.add_argument("--memory-lengths", type=_ints, default=_ints("16k,32k,64k"))
    ap.add_argument("--name", default="cpu", help="results/NAME.json and NAME.md")
    ap.add_argument("--note", default="", help="a sentence for the report (e.g. machine load)")
    ap.add_argument("--background-load", type=int, default=0, metavar="N",
                    help="run N busy processes (one core each) during the benchmark, so that "
                         "a loaded machine is measured on purpose rather than by chance")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    meta = machine() | {k: getattr(args, k) for k in ("heads", "kv_heads", "head_dim",
                                                      "block_size", "stride", "repeats", "note",
                                                      "background_load")}
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
                for _ in range(args.background_load)]
    try:
        if spinners:
            time.sleep(5)  # let the scheduler and the load average see them
        speed = bench_speed(args)
        memory = bench_memory(args) if args.memory else []
    finally:
        for proc in spinners:
            proc.kill()
    meta["load_avg_1min_end"] = round(os.getloadavg()[0], 2)
    path = write(args.name, meta, speed, memory)
    print(path.read_text())


if __name__ == "__main__":
    main()
