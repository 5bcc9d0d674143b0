"""XAttention on vLLM's CPU platform: the CPU backend, with XAttention prefill.

Decode and short chunks run on the CPU backend's own kernel; its KV cache writes are inherited,
so the cache keeps the layout that kernel reads (``"cpu"`` in ``paged.py``). That layout is
known for the ``vec`` and ``vec16`` kernels; on machines where vLLM would pick another one (AMX
with bf16, NEON on ARM) the builder selects ``vec``/``vec16`` instead and says so once.
"""

from __future__ import annotations

from vllm.logger import init_logger
from vllm.v1.attention.backends.cpu_attn import (
    CPUAttentionBackend,
    CPUAttentionBackendImpl,
    CPUAttentionMetadataBuilder,
)

from .backend import XAttentionBackendMixin, XAttentionBuilderMixin, XAttentionImplMixin

logger = init_logger("vllm.xattention")  # under "vllm": vLLM's log handler prints it
_KNOWN_ISAS = ("vec", "vec16")


class XAttentionCPUMetadataBuilder(XAttentionBuilderMixin, CPUAttentionMetadataBuilder):
    def __init__(self, kv_cache_spec, layer_names, vllm_config, device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        if self.isa not in _KNOWN_ISAS:
            chosen = "vec" if self.block_size % 32 == 0 else "vec16"
            logger.warning_once("xattention: using the CPU attention kernel %r instead of %r, "
                                "whose KV-cache layout XAttention cannot read", chosen, self.isa)
            self.isa = chosen
            self._set_isa_to_layers(layer_names)


class XAttentionCPUImpl(XAttentionImplMixin, CPUAttentionBackendImpl):
    kv_layout = "cpu"


class XAttentionCPUBackend(XAttentionBackendMixin, CPUAttentionBackend):
    """Selected with ``attention_backend="CUSTOM"`` once the plugin has registered it."""

    @staticmethod
    def get_name() -> str:
        return "CUSTOM"

    @staticmethod
    def get_impl_cls() -> type[XAttentionCPUImpl]:
        return XAttentionCPUImpl

    @staticmethod
    def get_builder_cls() -> type[XAttentionCPUMetadataBuilder]:
        return XAttentionCPUMetadataBuilder
