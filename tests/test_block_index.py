"""The Triton block-index compaction against its PyTorch twin (interpreter in CI)."""

from __future__ import annotations

import pytest
import torch

from xattention._backend import triton_import_error

if triton_import_error():
    pytest.skip(triton_import_error(), allow_module_level=True)

from xattention.kernels.sparse_attention import (  # noqa: E402
    build_block_index,
    build_block_index_torch,
)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("broadcast", [False, True])
def test_block_index_matches_torch(causal, broadcast):
    g = torch.Generator().manual_seed(int(causal) * 2 + int(broadcast))
    mask = torch.rand(2, 3, 5, 9, generator=g) < 0.4
    if broadcast:  # expanded views (stride 0) are how masks with size-1 dims arrive
        mask = mask[:1, :1].expand(2, 3, 5, 9)
    q_len, k_len, bs = 600, 1100, 128  # ragged key tail, diagonal band across two blocks
    index, count, full = build_block_index(mask, q_len, k_len, bs, causal)
    ref_index, ref_count, ref_full = build_block_index_torch(mask, q_len, k_len, bs, causal)
    assert torch.equal(count, ref_count) and torch.equal(full, ref_full)
    for b, h, i in torch.cartesian_prod(torch.arange(2), torch.arange(3), torch.arange(5)):
        n = int(count[b, h, i])
        assert torch.equal(index[b, h, i, :n], ref_index[b, h, i, :n])
        assert torch.equal(index[b, h, i, :n], mask[b, h, i].nonzero().flatten().int())
