"""Calibrate per-head thresholds for a model, then compare the profile with full attention and a
uniform threshold on the RULER-style suite, on the same samples.

    python examples/calibrate_smollm2.py                       # CPU sizes, tens of minutes
    python examples/calibrate_smollm2.py --device cuda --length 4096 --windows 32 --samples 20

Everything goes into ``--out-dir`` (default ``calibration-smollm2/`` in the current folder, never
the committed results): ``profile.json`` (made once, reused when it exists), ``ruler.jsonl``
(resumable: rerun the command to continue) and the report (``results.md`` and charts). The steps
are the library's own: ``calibrate`` (retrieval windows by default, see docs/calibration.md),
``run_suite`` and ``write_report``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from xattention.calibration import calibrate
from xattention.eval.models import MODELS, load_model
from xattention.eval.report import write_report
from xattention.eval.runner import Method, run_suite


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2", choices=sorted(MODELS))
    p.add_argument("--out-dir", default="calibration-smollm2")
    p.add_argument("--device", default="cpu")
    p.add_argument("--length", type=int, default=2048, help="calibration and suite length")
    p.add_argument("--windows", type=int, default=16,
                   help="calibration windows, and as many held-out ones")
    p.add_argument("--uniform", type=float, default=0.9, help="the uniform threshold compared")
    p.add_argument("--tasks", nargs="+", default=["niah_single_1", "niah_multikey_1", "vt"])
    p.add_argument("--samples", type=int, default=5, help="suite samples per task")
    args = p.parse_args()

    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model, tok = load_model(args.model, device=args.device)
    profile_path = out / "profile.json"
    if not profile_path.exists():
        profile = calibrate(model, tok, seq_len=args.length, calib_windows=args.windows,
                            heldout_windows=args.windows, chat=MODELS[args.model].chat,
                            reference_threshold=args.uniform, model_id=args.model)
        profile.save(profile_path)
    methods = [Method.full(), Method(threshold=args.uniform),
               Method.from_profile(profile_path, label="calibrated")]
    results = out / "ruler.jsonl"
    run_suite(args.model, [args.length], args.tasks, methods, num_samples=args.samples,
              out=results, device=args.device, loaded=(model, tok))
    write_report([results], out)
    print((out / "results.md").read_text())


if __name__ == "__main__":
    main()
