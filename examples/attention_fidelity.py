"""Per-head recall of the true attention mass, output error and density against the threshold,
on q/k/v captured from a real model and prompt (``--out PREFIX`` writes PREFIX.json and a chart,
PREFIX.png).

    python examples/attention_fidelity.py --model smollm2 --length 2048 --out /tmp/fidelity

Same as ``xattention eval fidelity``; shown here with the library calls spelled out.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import xattention.integrations.transformers as xt
from xattention.eval.fidelity import attention_fidelity, haystack_ids, plot_fidelity
from xattention.eval.models import load_model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="smollm2", choices=("smollm2", "gemma3"))
    p.add_argument("--length", type=int, default=2048)
    p.add_argument("--layer", type=int, default=None, help="default: the last layer")
    p.add_argument("--stride", type=int, default=8)
    p.add_argument("--out", default=None, help="output prefix: writes PREFIX.json, PREFIX.png")
    args = p.parse_args()

    model, tok = load_model(args.model)
    layer = args.layer if args.layer is not None else model.config.num_hidden_layers - 1
    ids = haystack_ids(tok, args.length, seed=0)
    q, k, v = xt.capture_attention_inputs(model, ids, layers=[layer])[layer]
    scale = xt.attention_layers(model)[layer][0].scaling
    res = attention_fidelity(q, k, v, [0.8, 0.9, 0.95], stride=args.stride, scale=scale,
                             backend="torch")
    for i, t in enumerate(res["thresholds"]):
        rec, dens = res["recall"][i], res["density"][i]
        print(f"layer {layer} threshold {t}: recall per head {[round(x, 3) for x in rec]}, "
              f"mean density {sum(dens) / len(dens):.3f}")
    if args.out is not None:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        result = {"model": args.model, "length": args.length, "stride": args.stride,
                  "block_size": 128, "layers": {str(layer): res}}
        out.with_name(out.name + ".json").write_text(json.dumps(result, indent=1))
        plot_fidelity(result, out.with_name(out.name + ".png"))
        print(f"wrote {out.with_name(out.name + '.json')} and {out.with_name(out.name + '.png')}")


if __name__ == "__main__":
    main()
