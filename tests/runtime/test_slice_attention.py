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
from slimpipe.runtime.exchange_attention import block_backward, block_forward
from slimpipe.runtime.slice_attention import Window, slice_attention


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


def _sliced(q, k, v, bounds, masks, dout, fwd_vol=0, bwd_vol=0, peer=None):
    """Slice by slice with a block store and hand-down; returns the concatenated output."""
    n = len(bounds) - 1
    store_k, store_v, acc, outs = [], [], {}, []

    def deposit(i, dk, dv):
        if i in acc:
            acc[i] = (acc[i][0] + dk, acc[i][1] + dv)
        else:
            acc[i] = (dk.clone(), dv.clone())

    for j in range(n):
        a, b = bounds[j], bounds[j + 1]
        kj, vj = k[:, a:b], v[:, a:b]
        win = Window(prefix_k=list(store_k), prefix_v=list(store_v),
                     handed=lambda j=j: acc.pop(j, (None, None)), deposit=deposit,
                     fwd_peer=peer, fwd_volume=min(fwd_vol, j), bwd_peer=peer, bwd_volume=min(bwd_vol, j))
        outs.append(slice_attention(q[:, a:b], kj, vj, win, masks))
        store_k.append(kj.detach())
        store_v.append(vj.detach())
    for j in reversed(range(n)):
        outs[j].backward(dout[:, bounds[j]:bounds[j + 1]])
    assert not acc, "a hand-down was never consumed"
    return torch.cat([o.detach() for o in outs], dim=1)


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
    out = _sliced(q, k, v, bounds, masks, dout, fwd_vol, bwd_vol, peer)
    torch.testing.assert_close(out, ref.detach(), rtol=1e-12, atol=1e-12)
    for got, want, name in zip((q.grad, k.grad, v.grad), ref_grads, "qkv"):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12, msg=f"d{name}")
    if peer is not None:
        assert peer.calls == sum(1 for j in range(len(bounds) - 1) if min(fwd_vol, j)) + sum(
            1 for j in range(len(bounds) - 1) if min(bwd_vol, j))
