"""Slice attention against plain causal attention, the zero-copy K/V window, and the K/V store's checks."""

from __future__ import annotations

import pytest
import torch
from torch.nn.functional import scaled_dot_product_attention

from slimpipe.runtime.attention import MaskCache
from slimpipe.runtime.kv import KVOrderError, KVStore


def _explicit(q, k, v):
    """Causal attention with an explicit boolean mask over the whole sequence.

    q (b, s, H, d), k/v (b, s, H_kv, d) -> (b, s, H, d).
    """
    s, rep = q.size(1), q.size(2) // k.size(2)
    mask = torch.ones(s, s, dtype=torch.bool, device=q.device).tril()
    out = scaled_dot_product_attention(q.transpose(1, 2), k.repeat_interleave(rep, 2).transpose(1, 2),
                                       v.repeat_interleave(rep, 2).transpose(1, 2), attn_mask=mask)
    return out.transpose(1, 2)


def _sliced(q, k, v, bounds, mode):
    """Forward slices in order through one KVStore entry, backward in reverse; returns out and the
    gradient function (dout -> dq, dk, dv) the way the executor drives it."""
    store = KVStore(bounds, MaskCache(mode))
    n = len(bounds) - 1
    leaves, outs = [], []
    for j in range(n):
        a, b = bounds[j], bounds[j + 1]
        qj, kj, vj = (x[:, a:b].detach().requires_grad_() for x in (q, k, v))
        out = store.begin_forward(0, 0, j).layer(0).attend(qj, kj, vj)
        leaves.append((qj, kj, vj))
        outs.append(out)

    def backward(dout):
        grads = [None] * n
        for j in reversed(range(n)):
            store.begin_backward(0, 0, j)
            outs[j].backward(dout[:, bounds[j]:bounds[j + 1]])
            store.end_backward(0, 0, j)
            grads[j] = [x.grad for x in leaves[j]]
        store.check_drained()
        return [torch.cat([g[i] for g in grads], 1) for i in range(3)]

    return torch.cat(outs, 1), backward


@pytest.mark.timeout(30)
@pytest.mark.parametrize("mode", ["table", "bias"])
@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (4, 2), (4, 1)])
@pytest.mark.parametrize("bounds", [[0, 8, 16, 24, 32], [0, 32], [0, 3, 10, 20, 32], [0, 1, 31, 32]])
def test_slices_equal_causal_attention(mode, heads, kv_heads, bounds) -> None:
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 32, heads, 8, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 32, kv_heads, 8, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 32, kv_heads, 8, generator=g, dtype=torch.float64, requires_grad=True)
    dout = torch.randn(1, 32, heads, 8, generator=g, dtype=torch.float64)
    ref = _explicit(q, k, v)
    ref_grads = torch.autograd.grad(ref, (q, k, v), dout)
    out, backward = _sliced(q, k, v, bounds, mode)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    for got, want in zip(backward(dout), ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.timeout(30)
def test_is_causal_is_wrong_for_slices() -> None:
    """The pitfall the lower-right mask avoids: is_causal=True aligns upper-left when q_len < kv_len."""
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 16, 8, generator=g) for _ in range(3))
    mask = torch.ones(8, 16, dtype=torch.bool).tril(8)  # query i sees keys ≤ 8 + i
    lower_right = scaled_dot_product_attention(q[:, :, 8:], k, v, attn_mask=mask)
    upper_left = scaled_dot_product_attention(q[:, :, 8:], k, v, is_causal=True)
    full = scaled_dot_product_attention(q, k, v, is_causal=True)[:, :, 8:]
    torch.testing.assert_close(lower_right, full)
    assert not torch.allclose(upper_left, full)


@pytest.mark.timeout(30)
def test_blocks_are_not_copied() -> None:
    """Slice j's attention saves its q, out, lse and its own K/V — the store's block j itself — and no
    window-sized tensor; the store holds exactly the forwarded slices' blocks (K/V follow the slices)."""
    store = KVStore([0, 8, 16, 24, 32], MaskCache("auto"))
    saved: list[torch.Tensor] = []

    def pack(t):
        saved.append(t)
        return t

    block = 1 * 8 * 2 * 8 * 4  # (b, t, H_kv, d) float32
    for j in range(4):
        x = torch.randn(1, 8, 2, 8, requires_grad=True)
        saved.clear()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            store.begin_forward(0, 0, j).layer(0).attend(torch.randn(1, 8, 4, 8), x, x * 2)
        own = [t for t in saved if t.untyped_storage().data_ptr() in store.buffer_ptrs]
        assert len(own) == 2 and all(t.shape == (1, 8, 2, 8) for t in own)  # own k, v: the blocks
        assert all(t.size(1) <= 8 and t.numel() <= 8 * 4 * 8 for t in saved)  # nothing window-sized
        assert store.nbytes() == ((j + 1) * 2 * block, 0)


def _store_with(forwarded: int, n: int = 4) -> KVStore:
    store = KVStore(list(range(0, 4 * n + 1, 4)), MaskCache("table"))
    for j in range(forwarded):
        x = torch.randn(1, 4, 1, 4, requires_grad=True)
        store.begin_forward(0, 0, j).layer(0).attend(torch.randn(1, 4, 2, 4), x, x)
    return store


@pytest.mark.timeout(30)
def test_store_rejects_fifo_backward() -> None:
    store = _store_with(4)
    with pytest.raises(KVOrderError, match="out of reverse order"):
        store.begin_backward(0, 0, 0)


@pytest.mark.timeout(30)
def test_store_rejects_backward_before_all_forwards() -> None:
    store = _store_with(3)
    with pytest.raises(KVOrderError, match="before all 4 slices were forwarded"):
        store.begin_backward(0, 0, 2)


@pytest.mark.timeout(30)
def test_store_rejects_forward_out_of_order() -> None:
    store = _store_with(1)
    with pytest.raises(KVOrderError, match="expected slice 1"):
        store.begin_forward(0, 0, 2)


@pytest.mark.timeout(30)
def test_store_rejects_leftover_state() -> None:
    with pytest.raises(KVOrderError, match="left over"):
        _store_with(2).check_drained()
