"""XAttention on vLLM's CUDA platform: vLLM's Triton backend, with XAttention prefill.

Decode and short chunks run on vLLM's Triton attention kernels and its KV cache writes are
inherited (layout ``"split"`` in ``paged.py``); prefill rows are gathered per request into
contiguous K/V and run through XAttention's Triton kernels. Not exercised in this repository's
CI (no CUDA build of vLLM there): the gather and the kernels are tested on the GPU on their own.
"""

from __future__ import annotations

from vllm.v1.attention.backends.triton_attn import (
    TritonAttentionBackend,
    TritonAttentionImpl,
    TritonAttentionMetadataBuilder,
)

from .backend import XAttentionBackendMixin, XAttentionBuilderMixin, XAttentionImplMixin


class XAttentionTritonMetadataBuilder(XAttentionBuilderMixin, TritonAttentionMetadataBuilder):
    pass


class XAttentionTritonImpl(XAttentionImplMixin, TritonAttentionImpl):
    kv_layout = "split"


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
