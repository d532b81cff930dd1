"""Slice attention over per-slice K/V blocks against one unsliced causal SDPA call (float64).

A sequence is cut into slices; each slice attends to the earlier slices' blocks (read in place) and its own
block; backward runs the slices in reverse, each handing its prefix gradients down block by block. Output
and every gradient must equal the unsliced attention's, with the native kernels, with the explicit-matmul
fallback (the CUDA path for dtypes FA2 does not take), and with a partner computing the earliest blocks
(the exchange's peer, computed in place here as in the local runtime).
"""

from __future__ import annotations

import pytest
import torch
from torch.nn.functional import scaled_dot_product_attention

from slimpipe.runtime.attention import MaskCache
from slimpipe.runtime.block_attention import block_backward, block_forward
from slimpipe.runtime.slice_attention import slice_attention
from tests.support.blocks import run_slices


class _InPlacePeer:
    """The partner of an exchange computed in this process (what LocalPipelineRuntime's owners do)."""

    def __init__(self) -> None:
        self.calls = 0

    def forward(self, q, k, v):
        self.calls += 1
        return _Ready(*block_forward(q, k, v, None))

    def backward(self, dout, q, out, lse, k, v):
        self.calls += 1
        return _Ready(*block_backward(dout, q, k, v, out, lse, None))


class _Ready:
    def __init__(self, *values) -> None:
        self.values = values

    def wait(self):
        return self.values


CASES = [  # (bounds, heads, kv heads, force math, forward volume, backward volume)
    ([0, 8, 16, 24, 32], 4, 2, False, 0, 0),
    ([0, 5, 13, 20, 32], 4, 1, False, 0, 0),  # unequal slices, MQA
    ([0, 8, 16, 24, 32], 4, 2, True, 0, 0),  # the explicit-matmul fallback
    ([0, 8, 16, 24, 32], 2, 2, False, 2, 1),  # exchange: different forward and backward volumes
    ([0, 8, 16, 24, 32], 4, 2, True, 1, 3),
    ([0, 32], 4, 2, False, 0, 0),  # one slice
]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("bounds, heads, kv_heads, math, fwd_vol, bwd_vol", CASES)
def test_blocks_equal_unsliced_attention(bounds, heads, kv_heads, math, fwd_vol, bwd_vol) -> None:
    g = torch.Generator().manual_seed(len(bounds) + heads + fwd_vol)
    s, d = bounds[-1], 8
    q = torch.randn(1, s, heads, d, dtype=torch.float64, generator=g, requires_grad=True)
    k = torch.randn(1, s, kv_heads, d, dtype=torch.float64, generator=g, requires_grad=True)
    v = torch.randn(1, s, kv_heads, d, dtype=torch.float64, generator=g, requires_grad=True)
    dout = torch.randn(1, s, heads, d, dtype=torch.float64, generator=g)
    ref = scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                                       enable_gqa=heads != kv_heads).transpose(1, 2)
    ref_grads = torch.autograd.grad(ref, (q, k, v), dout)
    masks = MaskCache()
    masks.force_math = math
    peer = _InPlacePeer() if fwd_vol or bwd_vol else None
    out, _ = run_slices(lambda j, *qkv: slice_attention(*qkv, masks), q, k, v, bounds, dout,
                        lambda j: dict(fwd_peer=peer, fwd_volume=min(fwd_vol, j), bwd_peer=peer,
                                       bwd_volume=min(bwd_vol, j)))
    torch.testing.assert_close(out, ref.detach(), rtol=1e-12, atol=1e-12)
    for got, want, name in zip((q.grad, k.grad, v.grad), ref_grads, "qkv"):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12, msg=f"d{name}")
    if peer is not None:
        assert peer.calls == sum(1 for j in range(len(bounds) - 1) if min(fwd_vol, j)) + sum(
            1 for j in range(len(bounds) - 1) if min(bwd_vol, j))
