"""The KV cache the backend writes (the engine's own cache writer, inherited) reads back through
the block table with gather_kv: both CPU kernels' layouts on the CPU engine, the Triton backend's
on the CUDA engine (``"stacked"`` on vLLM 0.25, ``"split"`` on 0.32)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from conftest import on_cpu
from vllm.v1.attention.backend import AttentionType

from xattention.integrations.vllm.paged import gather_kv

cpu_only = pytest.mark.skipif(not on_cpu(), reason="vLLM's CPU engine")
cuda_only = pytest.mark.skipif(on_cpu() or not torch.cuda.is_available(),
                               reason="vLLM's CUDA engine on a GPU")


def test_backend_keeps_the_engine_cache_writer():
    # Decode runs on the engine's kernel, so the cache must stay in the layout that kernel reads.
    if on_cpu():
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackendImpl as engine_impl

        from xattention.integrations.vllm.cpu import XAttentionCPUBackend as backend
        from xattention.integrations.vllm.cpu import XAttentionCPUImpl as impl
    else:
        from vllm.v1.attention.backend import AttentionCGSupport
        from vllm.v1.attention.backends.triton_attn import TritonAttentionImpl as engine_impl

        from xattention.integrations.vllm.cuda import XAttentionCUDABackend as backend
        from xattention.integrations.vllm.cuda import XAttentionTritonImpl as impl
        # A fully captured mixed batch would replay without the sparse plan: uniform ones only.
        support = backend.get_builder_cls().get_cudagraph_support(None, None)
        assert support == AttentionCGSupport.UNIFORM_BATCH
    assert impl.do_kv_cache_update is engine_impl.do_kv_cache_update
    assert backend.get_name() == "CUSTOM"
    assert backend.get_impl_cls() is impl


@cpu_only
@pytest.mark.parametrize("isa, head_dim, page", [("vec", 64, 128), ("vec", 64, 32),
                                                 ("vec16", 64, 32), ("vec16", 80, 16)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_written_cache_reads_back_through_the_block_table(isa, head_dim, page, dtype, gen):
    from xattention.integrations.vllm.cpu import XAttentionCPUImpl

    heads, length, num_pages = 3, 2 * page + 7, 9
    k = torch.randn(length, heads, head_dim, generator=gen).to(dtype)
    v = torch.randn(length, heads, head_dim, generator=gen).to(dtype)
    table = torch.randperm(num_pages, generator=gen)[:4].to(torch.int32)
    slots = torch.stack([table[t // page].long() * page + t % page for t in range(length)])
    cache = torch.full((num_pages, heads, page, 2 * head_dim), float("nan"), dtype=dtype)
    layer = SimpleNamespace(isa=isa, _k_scale_float=1.0, _v_scale_float=1.0)
    impl = SimpleNamespace(attn_type=AttentionType.DECODER, kv_cache_dtype="auto")
    XAttentionCPUImpl.do_kv_cache_update(impl, layer, k, v, cache, slots)
    gk, gv = gather_kv(cache, table, length, "cpu")
    torch.testing.assert_close(gk[0], k.transpose(0, 1), rtol=0, atol=0)
    torch.testing.assert_close(gv[0], v.transpose(0, 1), rtol=0, atol=0)


@cuda_only
@pytest.mark.parametrize("head_dim, page", [(64, 16), (128, 32)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_cuda_written_cache_reads_back_through_the_block_table(head_dim, page, dtype, gen):
    from vllm.v1.attention.backends.triton_attn import TritonAttentionBackend

    from xattention.integrations.vllm.cuda import XAttentionTritonImpl

    heads, length, num_pages = 3, 2 * page + 7, 9
    k = torch.randn(length, heads, head_dim, generator=gen).to("cuda", dtype)
    v = torch.randn(length, heads, head_dim, generator=gen).to("cuda", dtype)
    table = torch.randperm(num_pages, generator=gen)[:4].to(torch.int32)
    slots = torch.stack([table[t // page].long() * page + t % page for t in range(length)])
    shape = TritonAttentionBackend.get_kv_cache_shape(num_pages, page, heads, head_dim)
    cache = torch.full(shape, float("nan"), dtype=dtype, device="cuda")
    scale = torch.ones((), device="cuda")
    layer = SimpleNamespace(_k_scale=scale, _v_scale=scale, _k_scale_float=1.0,
                            _v_scale_float=1.0)
    impl = SimpleNamespace(attn_type=AttentionType.DECODER, kv_cache_dtype="auto",
                           _is_per_token_head_quant=False, head_size=head_dim)
    XAttentionTritonImpl.do_kv_cache_update(impl, layer, k, v, cache, slots.cuda())
    gk, gv = gather_kv(cache, table.cuda(), length, XAttentionTritonImpl.kv_layout)
    torch.testing.assert_close(gk[0], k.transpose(0, 1), rtol=0, atol=0)
    torch.testing.assert_close(gv[0], v.transpose(0, 1), rtol=0, atol=0)
