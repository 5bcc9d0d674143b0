"""Video-model attention on the GPU: XAttention (non-causal) vs dense SDPA cuDNN (and FA4).

One command, on the lent GPU (< 4 minutes on an H200):

    PYTHONPATH=src python benchmarks/bench_video.py            # writes results/video.{json,md}
    PYTHONPATH=src python benchmarks/bench_video.py --smoke    # tiny sizes on the CPU: it runs

Part 1, attention alone at the shapes users run (B=1, D=128, bf16, non-causal): HunyuanVideo
720p x 129 frames (33 x 45 x 80 = 118,800 video tokens, 24 heads), Wan 2.x 480p x 81 frames
(21 x 30 x 52 = 32,760 tokens, 40 heads) and 720p (21 x 45 x 80 = 75,600 tokens, 40 heads).
Random Q/K/V barely sparsify (every block holds about the same mass), so the inputs are the
structured synthetic ones of ``xattention.synthetic.structured_qkv`` (local windows, sinks, heavy
keys, topic segments, noise; imported from the demo module, which is moving to
``xattention.synthetic``): four distinct heads tiled to the head count, the shorter shapes being
prefixes of one 119,056-token draw. The HunyuanVideo shape also runs its joint layout (256 text
tokens after the video, the last 56 padding) through the switch's exact text handling, against
SDPA with the key-padding mask, as the stock processor runs it. The rows say how fast
XAttention is *at the density these inputs give*; they say nothing about the density a trained
video model's heads reach.

Part 2, one denoising step of a randomly initialised Wan transformer at the 480p shape (14B
widths: 40 heads x 128, FFN 13824; only a few layers, to fit the time), stock dense vs XAttention
through ``xattention.integrations.diffusers``. Random weights give nearly uniform attention, so
the density stays high: this part measures the overhead of the switch on a real forward (estimate,
selection, the processor plumbing), not the speed-up of a trained model.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, bench_ms, gpu_info, print_table  # noqa: E402

from xattention import block_density, estimate_block_scores, select_blocks, xattention  # noqa: E402
from xattention.synthetic import structured_qkv  # noqa: E402

SHAPES = [  # (name, video tokens, heads, joint text tokens / of them valid)
    ("wan-480p-81f", 21 * 30 * 52, 40, None),
    ("wan-720p-81f", 21 * 45 * 80, 40, None),
    ("hunyuan-720p-129f", 33 * 45 * 80, 24, (256, 200)),
]
SMOKE_SHAPES = [("smoke", 384, 2, (24, 20))]
THRESHOLDS = (0.9, 0.95)
DISTINCT_HEADS = 4  # one of each of the generator's archetypes, tiled to the head count


def _timer(device: str):
    if device == "cuda":
        return bench_ms

    def cpu_ms(fn, warmup: int = 1, rep: int = 1) -> float:
        fn()
        t0 = time.perf_counter()
        for _ in range(rep):
            fn()
        return (time.perf_counter() - t0) * 1e3 / rep
    return cpu_ms


def _fa4():
    """FA4's dense forward, or the reason it is not importable."""
    try:
        from flash_attn.cute import flash_attn_func
    except Exception as exc:  # not installed on the image: the row is skipped, with the reason
        return None, f"{type(exc).__name__}: {exc}"
    return flash_attn_func, None


def _inputs(max_len: int, head_dim: int, device: str, dtype: torch.dtype):
    t0 = time.time()
    q, k, v, _ = structured_qkv(1, DISTINCT_HEADS, DISTINCT_HEADS, max_len, head_dim=head_dim,
                                seed=0, device=device)
    print(f"structured inputs: {max_len} tokens x {DISTINCT_HEADS} heads in "
          f"{time.time() - t0:.0f} s", flush=True)
    return tuple(x.to(device, dtype) for x in (q, k, v))


def _tile(x: torch.Tensor, length: int, heads: int) -> torch.Tensor:
    reps = -(-heads // x.shape[1])
    return x[:, :, :length].repeat(1, reps, 1, 1)[:, :heads].contiguous()


def _one_shape(q, k, v, common: dict, block_size: int, stride: int, device: str, fa4
               ) -> list[dict]:
    timer = _timer(device)
    backend = "auto" if device == "cuda" else "torch"
    length = q.shape[2]
    if device == "cuda":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            ref = F.scaled_dot_product_attention(q, k, v)
            dense_ms = timer(lambda: F.scaled_dot_product_attention(q, k, v))
        dense_name = "sdpa_cudnn"
    else:
        ref = F.scaled_dot_product_attention(q, k, v)
        dense_ms = timer(lambda: F.scaled_dot_product_attention(q, k, v))
        dense_name = "sdpa"
    rows = [common | {"method": dense_name, "ms": dense_ms, "density": 1.0, "x_dense": 1.0}]
    if fa4 is not None:
        ql, kl, vl = (x.transpose(1, 2).contiguous() for x in (q, k, v))
        try:
            fa4_ms = timer(lambda: fa4(ql, kl, vl, causal=False))
            rows.append(common | {"method": "fa4_dense", "ms": fa4_ms, "density": 1.0,
                                  "x_dense": dense_ms / fa4_ms})
        except Exception as exc:  # imported but cannot run here: say so, keep the other rows
            print(f"FA4 dense failed at {common['shape']}: {type(exc).__name__}: {exc}")
    for thr in THRESHOLDS:
        out, mask = xattention(q, k, v, threshold=thr, stride=stride, block_size=block_size,
                               causal=False, backend=backend, return_mask=True)
        density = block_density(mask, length, length, block_size, causal=False)["overall"]
        err = float((out.float() - ref.float()).norm() / ref.float().norm())
        ms = timer(lambda: xattention(q, k, v, threshold=thr, stride=stride,
                                      block_size=block_size, causal=False, backend=backend))
        est_ms = timer(lambda: select_blocks(
            estimate_block_scores(q, k, stride=stride, block_size=block_size, causal=False,
                                  backend=backend),
            thr, q_len=length, k_len=length, block_size=block_size, causal=False,
            backend=backend))
        rows.append(common | {"method": f"xattention@{thr}", "ms": ms, "density": density,
                              "x_dense": dense_ms / ms, "estimate_select_ms": est_ms,
                              "rel_err": err})
    return rows


def _joint_rows(q, k, v, text: tuple[int, int], common: dict, block_size: int, stride: int,
                device: str) -> list[dict]:
    """HunyuanVideo's joint layout: the video tokens, then text tokens with a padded tail; the
    exact text handling of the diffusers switch (docs/video.md) on top of the video attention."""
    from xattention.integrations.diffusers.joint import joint_attention

    timer = _timer(device)
    backend = "auto" if device == "cuda" else "torch"
    length = q.shape[2] - text[0]
    keys = torch.arange(length, length + text[1], device=q.device)
    visible = torch.ones(1, 1, 1, q.shape[2], dtype=torch.bool, device=q.device)
    visible[..., length + text[1]:] = False  # the padded tail of the prompt
    # What the stock processor runs: SDPA over the joined sequence with the key-padding mask.
    # torch picks the kernel among those that take a mask; never the math path (it would
    # materialise N x N scores per head).
    if device == "cuda":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        allowed = sdpa_kernel([SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION])
    else:
        allowed = contextlib.nullcontext()
    with allowed:
        ref = F.scaled_dot_product_attention(q, k, v, attn_mask=visible)
        dense_ms = timer(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=visible))
    common = common | {"tokens": q.shape[2]}
    rows = [common | {"method": f"sdpa masked joint (+{text[0]} text, {text[1]} valid)",
                      "ms": dense_ms, "density": 1.0, "x_dense": 1.0}]
    for thr in THRESHOLDS:
        def run():
            return joint_attention(q, k, v, video=(0, length), text_keys=keys, threshold=thr,
                                   stride=stride, block_size=block_size,
                                   scale=q.shape[-1] ** -0.5, backend=backend)
        out, mask = run()
        err = float((out.float() - ref.float()).norm() / ref.float().norm())
        density = block_density(mask, length, length, block_size, causal=False)["overall"]
        ms = timer(run)
        rows.append(common | {"method": f"xattention joint@{thr}",
                              "ms": ms, "density": density, "x_dense": dense_ms / ms,
                              "rel_err": err})
    return rows


def attention_rows(shapes, head_dim: int, block_size: int, stride: int, device: str,
                   dtype: torch.dtype) -> list[dict]:
    base = _inputs(max(n + (t[0] if t else 0) for _, n, _, t in shapes), head_dim, device,
                   dtype)
    fa4, fa4_reason = _fa4() if device == "cuda" else (None, "CPU smoke run")
    if fa4 is None:
        print(f"FA4 dense skipped: {fa4_reason}", flush=True)
    rows = []
    for name, length, heads, text in shapes:
        q, k, v = (_tile(x, length, heads) for x in base)
        common = {"shape": name, "tokens": length, "heads": heads}
        done = _one_shape(q, k, v, common, block_size, stride, device, fa4)
        if text is not None:
            q, k, v = (_tile(x, length + text[0], heads) for x in base)
            try:
                done += _joint_rows(q, k, v, text, common, block_size, stride, device)
            except Exception as exc:  # keep the other rows; the reason is printed
                if device != "cuda":
                    raise
                print(f"joint rows failed at {name}: {type(exc).__name__}: {exc}", flush=True)
        print_table(done, ["shape", "method", "ms", "x_dense", "density", "rel_err"])
        rows += done
        q = k = v = None  # free this shape's tensors before the next one is tiled
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows


def forward_rows(num_layers: int, smoke: bool, block_size: int, stride: int, device: str,
                 dtype: torch.dtype) -> list[dict]:
    try:
        from diffusers import WanTransformer3DModel

        import xattention.integrations.diffusers as xd
    except Exception as exc:
        print(f"whole-forward part skipped: diffusers not importable ({exc})", flush=True)
        return []
    if smoke:
        config = dict(num_attention_heads=2, attention_head_dim=32, in_channels=4,
                      out_channels=4, text_dim=32, freq_dim=32, ffn_dim=64, rope_max_seq_len=64)
        latent, text = (1, 4, 3, 16, 16), (1, 16, 32)
    else:  # Wan 2.x 14B widths; 480p x 81 frames = 21 x 60 x 104 latents, patch (1, 2, 2)
        config = dict(num_attention_heads=40, attention_head_dim=128, in_channels=16,
                      out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=13824,
                      cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6,
                      rope_max_seq_len=1024)
        latent, text = (1, 16, 21, 60, 104), (1, 512, 4096)
    torch.manual_seed(0)
    model = WanTransformer3DModel(patch_size=(1, 2, 2), num_layers=num_layers, **config)
    model = model.to(device, dtype).eval()
    tokens = latent[2] * (latent[3] // 2) * (latent[4] // 2)
    x = torch.randn(latent, device=device, dtype=dtype)
    enc = torch.randn(text, device=device, dtype=dtype)
    t = torch.tensor([500.0], device=device)
    timer = _timer(device)
    backend = "auto" if device == "cuda" else "torch"

    def step():
        with torch.no_grad():
            return model(hidden_states=x, timestep=t, encoder_hidden_states=enc).sample

    common = {"model": f"Wan random init, {num_layers} layers", "tokens": tokens}
    dense_ms = timer(step)
    rows = [common | {"method": "stock dense", "ms": dense_ms, "density": 1.0, "x_dense": 1.0}]
    for thr in THRESHOLDS:
        xd.enable(model, threshold=thr, stride=stride, block_size=block_size, warmup_steps=0,
                  backend=backend)
        step()
        density = xd.last_stats(model).overall()
        ms = timer(step)
        rows.append(common | {"method": f"xattention@{thr}", "ms": ms, "density": density,
                              "x_dense": dense_ms / ms})
        xd.disable(model)
    print_table(rows, ["model", "tokens", "method", "ms", "x_dense", "density"])
    return rows


NOTES = """
What these numbers can and cannot tell:

* Attention rows: speed of XAttention (estimate + selection + block-sparse attention, non-causal)
  against dense attention on the same card, *at the density the synthetic inputs produce*. The
  inputs are LLM-like structured tensors (local windows, sinks, heavy keys, topic segments), not
  the Q/K/V of a trained video model: a real model's heads give other densities (the paper's
  video results are on the trained HunyuanVideo, threshold 0.9 / 0.95, 5 dense warm-up steps).
  `rel_err` is the output error against dense on these inputs, not a video-quality metric.
* Whole-forward rows: a randomly initialised Wan transformer (14B widths, few layers). Random
  weights give nearly uniform attention, so the density is close to 1 and XAttention cannot win
  there; the rows bound the switch's overhead on a real forward (estimate, selection,
  processor plumbing). No video weights ship on the package index;
  quality (VBench, PSNR against dense) needs real weights (docs/video.md).
"""


def write(meta: dict, attention: list[dict], forward: list[dict], out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "video.json").write_text(json.dumps(
        {"meta": meta, "attention": attention, "forward": forward}, indent=2))

    def table(rows, cols):
        lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        for r in rows:
            cells = [r.get(c, "") for c in cols]
            lines.append("| " + " | ".join(
                f"{c:.3g}" if isinstance(c, float) and not math.isnan(c) else str(c)
                for c in cells) + " |")
        return lines

    lines = [f"# Video attention: XAttention vs dense (non-causal, {meta['dtype']}, "
             f"D={meta['head_dim']}, B=1)", "",
             f"GPU: {meta.get('gpu', 'CPU smoke run')}; torch {meta['torch']}; {meta['date']}; "
             f"block {meta['block_size']}, stride {meta['stride']}; `x_dense` = dense ms / ms", "",
             "## Attention, structured synthetic Q/K/V", ""]
    lines += table(attention, ["shape", "tokens", "heads", "method", "ms", "x_dense", "density",
                               "estimate_select_ms", "rel_err"])
    if meta.get("fa4_skipped"):
        lines += ["", f"FA4 dense skipped: {meta['fa4_skipped']}"]
    lines += ["", "## One denoising step, randomly initialised Wan transformer (480p x 81)", ""]
    lines += table(forward, ["model", "tokens", "method", "ms", "x_dense", "density"]) \
        if forward else [f"not run: {meta.get('forward_error', 'diffusers not importable')}"]
    lines += NOTES.splitlines()
    (out_dir / "video.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU (it runs)")
    ap.add_argument("--layers", type=int, default=2, help="Wan layers in the whole forward")
    ap.add_argument("--block-size", type=int, default=128)
    ap.add_argument("--stride", type=int, default=8)
    ap.add_argument("--out", type=Path, default=None,
                    help="result folder (default: benchmarks/results; a temp folder for --smoke)")
    args = ap.parse_args(argv)
    smoke = args.smoke
    if not smoke and not torch.cuda.is_available():
        ap.error("no CUDA device: run with --smoke for the CPU check")
    device, dtype = ("cpu", torch.float32) if smoke else ("cuda", torch.bfloat16)
    block_size, stride = (32, 4) if smoke else (args.block_size, args.stride)
    head_dim = 32 if smoke else 128
    t0 = time.time()
    meta = gpu_info() if device == "cuda" else {"torch": torch.__version__}
    meta |= {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "block_size": block_size,
             "stride": stride, "head_dim": head_dim, "dtype": str(dtype),
             "inputs": "xattention.synthetic.structured_qkv, 4 distinct heads tiled"}
    if device == "cuda":
        fa4, reason = _fa4()
        if fa4 is None:
            meta["fa4_skipped"] = reason
    attention = attention_rows(SMOKE_SHAPES if smoke else SHAPES, head_dim, block_size, stride,
                               device, dtype)
    try:
        forward = forward_rows(args.layers, smoke, block_size, stride, device, dtype)
    except Exception as exc:  # keep part 1's results; the failure is printed and written down
        if smoke:
            raise
        forward = []
        meta["forward_error"] = f"{type(exc).__name__}: {exc}"
        print(f"whole-forward part failed: {meta['forward_error']}", flush=True)
    meta["seconds"] = round(time.time() - t0, 1)
    out_dir = args.out or (Path(tempfile.mkdtemp(prefix="bench_video_")) if smoke else RESULTS)
    write(meta, attention, forward, out_dir)
    print(f"\nwrote {out_dir / 'video.md'} ({meta['seconds']} s)\n")
    print_table(attention, ["shape", "method", "ms", "x_dense", "density"])
    if forward:
        print_table(forward, ["method", "ms", "x_dense", "density"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
