"""XAttention on vLLM's CUDA platform: vLLM's Triton backend, with XAttention prefill.

Decode and short chunks run on vLLM's Triton attention kernels and its KV cache writes are
inherited (layout ``"stacked"`` on vLLM 0.25, ``"split"`` on 0.32: ``paged.py``); prefill rows
run through XAttention's Triton kernels, which read each request's K/V in place through its
block-table row (``paged.paged_kv``). Not
exercised in this repository's CI (no CUDA build of vLLM there): ``eval/gpu/vllm_cuda.sh tests``
runs ``tests/vllm`` on the lent GPU with vLLM 0.25.
"""

from __future__ import annotations

from vllm.v1.attention.backend import AttentionCGSupport
from vllm.v1.attention.backends.triton_attn import (
    TritonAttentionBackend,
    TritonAttentionImpl,
    TritonAttentionMetadataBuilder,
)

from .backend import XAttentionBackendMixin, XAttentionBuilderMixin, XAttentionImplMixin


class XAttentionTritonMetadataBuilder(XAttentionBuilderMixin, TritonAttentionMetadataBuilder):
    # vLLM's Triton builder declares full CUDA graphs for every batch (ALWAYS), but a replayed
    # graph skips the host code that plans and runs a sparse row (build / forward), so a prefill
    # inside a fully captured mixed batch would silently run dense. Full graphs of uniform
    # batches (decodes, speculative decodes: a few tokens per request, under any
    # XATTENTION_MIN_PREFILL_LEN worth setting) carry no sparse row; a mixed batch runs with
    # attention outside the graph (vLLM's default FULL_AND_PIECEWISE, which this keeps; vLLM
    # lowers a FULL setting to it or to FULL_DECODE_ONLY, with its own warning).
    _cudagraph_support = AttentionCGSupport.UNIFORM_BATCH


def _triton_cache_layout() -> str:
    """vLLM 0.25's Triton cache stacks K and V on dim 1 (5-D); 0.32's splits the last dim (4-D)."""
    shape = TritonAttentionBackend.get_kv_cache_shape(1, 16, 1, 8)
    return "stacked" if len(shape) == 5 else "split"


class XAttentionTritonImpl(XAttentionImplMixin, TritonAttentionImpl):
    kv_layout = _triton_cache_layout()


class XAttentionCUDABackend(XAttentionBackendMixin, TritonAttentionBackend):
    """Selected with ``attention_backend="CUSTOM"`` once the plugin has registered it."""

    max_head_size = 256  # the Triton kernels

    @staticmethod
    def get_name() -> str:
        return "CUSTOM"

    @staticmethod
    def get_impl_cls() -> type[XAttentionTritonImpl]:
        return XAttentionTritonImpl

    @staticmethod
    def get_builder_cls() -> type[XAttentionTritonMetadataBuilder]:
        return XAttentionTritonMetadataBuilder
