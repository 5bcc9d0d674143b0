"""XAttention in a few lines: block-sparse causal attention, compared with dense attention.

Run:  python examples/quickstart.py     (CPU is fine; on a CUDA GPU the Triton kernels are used)
"""

import torch
import torch.nn.functional as F

from xattention import block_density, xattention
from xattention.synthetic import structured_qkv

device = "cuda" if torch.cuda.is_available() else "cpu"
dtype = torch.bfloat16 if device == "cuda" else torch.float32

# The README's quick start (it prints ~0.22 kept). q [B, Hq, L, D], k/v [B, Hkv, L, D] (GQA: 8
# query heads share 2 KV heads). Random tensors would do, but their attention has no structure to
# exploit; these look like a real LLM's.
q, k, v, _ = structured_qkv(batch=1, heads=8, kv_heads=2, q_len=4096, head_dim=64, seed=0)
q, k, v = (t.to(device, dtype) for t in (q, k, v))

out, mask = xattention(q, k, v, threshold=0.9, stride=8, block_size=128, causal=True,
                       return_mask=True)
density = block_density(mask, q.shape[2], k.shape[2], block_size=128)["overall"]

ref = F.scaled_dot_product_attention(q, k.repeat_interleave(4, 1), v.repeat_interleave(4, 1),
                                     is_causal=True)
err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
print(f"output {tuple(out.shape)} {out.dtype}; kept {density:.1%} of the causal blocks; "
      f"relative error vs dense {err:.3f}")
