"""The KV cache the backend writes (vLLM's own CPU writer, inherited) reads back through the block
table with gather_kv, for both CPU kernels whose layout the backend reads."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from vllm.v1.attention.backend import AttentionType
from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackendImpl

from xattention.integrations.vllm.cpu import XAttentionCPUBackend, XAttentionCPUImpl
from xattention.integrations.vllm.paged import gather_kv


def test_backend_keeps_the_engine_cache_writer():
    # Decode runs on the CPU kernel, so the cache must stay in the layout that kernel reads.
    assert XAttentionCPUImpl.do_kv_cache_update is CPUAttentionBackendImpl.do_kv_cache_update
    assert XAttentionCPUBackend.get_name() == "CUSTOM"
    assert XAttentionCPUBackend.get_impl_cls() is XAttentionCPUImpl


@pytest.mark.parametrize("isa, head_dim, page", [("vec", 64, 128), ("vec", 64, 32),
                                                 ("vec16", 64, 32), ("vec16", 80, 16)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_written_cache_reads_back_through_the_block_table(isa, head_dim, page, dtype, gen):
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
