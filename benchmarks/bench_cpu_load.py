"""The CPU benchmark on a quiet and on a loaded machine, with OpenMP's two wait policies.

Runs ``bench_cpu.py`` four times in subprocesses (OpenMP reads ``OMP_WAIT_POLICY`` once, when torch
loads): quiet and with ``--background-load N`` busy processes, each with the default policy
(idle threads spin) and with ``PASSIVE``. For every method the table gives the time in each
setting and the slow-down under load, next to dense SDPA's, so a reader sees whether the sparse
path degrades more than dense does.

    python benchmarks/bench_cpu_load.py --lengths 4k,8k --background-load 3

Writes ``results/cpu_load.{json,md}`` (the four runs' own tables go to a temporary folder).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).parent
RESULTS = Path(os.environ.get("XATTENTION_BENCH_OUT", HERE / "results"))
SETTINGS = [("quiet", 0, None), ("quiet", 0, "PASSIVE"), ("loaded", None, None),
            ("loaded", None, "PASSIVE")]


def run(args, load: int, policy: str | None, folder: str, name: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env["XATTENTION_BENCH_OUT"] = folder
    if policy:
        env["OMP_WAIT_POLICY"] = policy
    cmd = [sys.executable, str(HERE / "bench_cpu.py"), "--lengths", args.lengths, "--densities",
           args.densities, "--thresholds", args.thresholds, "--repeats", str(args.repeats),
           "--background-load", str(load), "--name", name]
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
    return json.loads((Path(folder) / f"{name}.json").read_text())


def key(row: dict) -> tuple:
    return row["length"], row["method"], row.get("threshold", row.get("target_density"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    ap.add_argument("--lengths", default="4k,8k")
    ap.add_argument("--densities", default="0.06,0.2,1.0")
    ap.add_argument("--thresholds", default="0.9,0.95")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--background-load", type=int, default=3, metavar="N")
    args = ap.parse_args()
    runs = {}
    with tempfile.TemporaryDirectory() as folder:
        for where, load, policy in SETTINGS:
            label = f"{where}, {policy or 'default'}"
            print(f"== {label}", flush=True)
            runs[label] = run(args, args.background_load if load is None else load, policy,
                              folder, f"{where}_{policy or 'default'}")
    first = next(iter(runs.values()))
    rows = []
    for base in first["speed"]:
        row = {"length": base["length"], "method": base["method"],
               "setting": base.get("threshold", base.get("target_density", "-"))}
        for label, data in runs.items():
            match = next(r for r in data["speed"] if key(r) == key(base))
            row[f"{label} ms"] = match["ms"]
        rows.append(row)
    for policy in ("default", "PASSIVE"):
        for row in rows:
            row[f"slow-down {policy}"] = row[f"loaded, {policy} ms"] / row[f"quiet, {policy} ms"]
    meta = {label: {k: v for k, v in data["meta"].items()
                    if k in ("cpu", "cores", "threads", "torch", "load_avg_1min",
                             "load_avg_1min_end", "date", "background_load")}
            for label, data in runs.items()}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "cpu_load.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    cols = list(rows[0])
    m = first["meta"]
    lines = ["# CPU benchmark, quiet vs loaded, OpenMP wait policy default vs PASSIVE", "",
             f"CPU: {m['cpu']}, {m['cores']} cores, {m['threads']} torch threads; torch "
             f"{m['torch']}; {m['date']}. Loaded: {args.background_load} busy processes beside "
             "the benchmark (`--background-load`). B=1, 8 query / 2 KV heads, D=64, causal, "
             "float32, block 128, stride 8; median of "
             f"{args.repeats} interleaved runs. slow-down = loaded / quiet time (same policy).",
             "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in rows:
        cells = [f"{v:.1f}" if c.endswith(" ms") else f"{v:.2f}x" if c.startswith("slow-down")
                 else str(v) for c, v in row.items()]
        lines.append("| " + " | ".join(cells) + " |")
    (RESULTS / "cpu_load.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
