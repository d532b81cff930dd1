"""The two-block slice attention (prefix unmasked + diagonal square-causal, log-sum-exp merged) against a
plain masked reference: forward and backward, fp64 and fp32, MHA and GQA, slice 0 and later slices."""

from __future__ import annotations

import pytest
import torch
from torch.nn.functional import scaled_dot_product_attention

from slimpipe.runtime.attention import MaskCache, WindowBlocks, recompute_backward, window_attention
from slimpipe.runtime.block_attention import block_backward, block_forward, math_block_forward
from slimpipe.runtime.kv import KVStore

TOL = {torch.float64: 1e-12, torch.float32: 2e-6}


def _reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int) -> torch.Tensor:
    """q (b, t, H, d) at positions [start, start+t) over k/v (b, start+t, H_kv, d) with an explicit boolean
    mask and explicitly repeated K/V heads (no kernel shortcut involved) -> (b, t, H, d)."""
    end, rep = k.size(1), q.size(2) // k.size(2)
    pos = torch.arange(end, device=q.device)
    mask = pos[None, :] <= pos[start:, None]  # (t, end)
    out = scaled_dot_product_attention(q.transpose(1, 2), k.repeat_interleave(rep, 2).transpose(1, 2),
                                       v.repeat_interleave(rep, 2).transpose(1, 2), attn_mask=mask)
    return out.transpose(1, 2)


def _inputs(t: int, start: int, heads: int, kv_heads: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, t, heads, 16, generator=g, dtype=dtype, requires_grad=True)
    k = torch.randn(2, start + t, kv_heads, 16, generator=g, dtype=dtype, requires_grad=True)
    v = torch.randn(2, start + t, kv_heads, 16, generator=g, dtype=dtype, requires_grad=True)
    dout = torch.randn(2, t, heads, 16, generator=g, dtype=dtype)
    return q, k, v, dout


@pytest.mark.timeout(60)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (4, 2), (6, 1)])
@pytest.mark.parametrize("t, start", [(24, 0), (24, 40), (7, 3), (1, 63), (40, 1)])
def test_window_attention_matches_masked_reference(dtype, heads, kv_heads, t, start) -> None:
    q, k, v, dout = _inputs(t, start, heads, kv_heads, dtype)
    masks = MaskCache("auto")
    out = window_attention(q, k, v, start, masks, start + t)
    ref = _reference(q, k, v, start)
    tol = TOL[dtype]
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol)
    got = torch.autograd.grad(out, (q, k, v), dout)
    want = torch.autograd.grad(ref, (q, k, v), dout)
    for name, a, b in zip("qkv", got, want):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol, msg=lambda m, n=name: f"d{n}: {m}")
    assert not masks.ptrs, "the two-block path must not build a mask table"
    if start:
        assert out.grad_fn is not None and "WindowBlocks" in type(out.grad_fn).__name__
        assert out.is_contiguous()  # (b, t, H, d): the model's view(b, t, H·d) stays a view


@pytest.mark.timeout(30)
def test_window_attention_bf16_merges_in_fp32() -> None:
    """16-bit inputs: blocks in the CPU kernel, merge in fp32 (the lse dtype), close to an fp32 reference."""
    q, k, v, dout = _inputs(24, 40, 4, 2, torch.float32, seed=5)
    lo = [x.detach().bfloat16().requires_grad_() for x in (q, k, v)]
    out = window_attention(*lo, 40, MaskCache("auto"), 64)
    assert out.dtype == torch.bfloat16 and "WindowBlocks" in type(out.grad_fn).__name__
    ref = _reference(q, k, v, 40)
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)
    for a, b in zip(torch.autograd.grad(out, lo, dout.bfloat16()), torch.autograd.grad(ref, (q, k, v), dout)):
        torch.testing.assert_close(a.float(), b, rtol=3e-2, atol=3e-2)


@pytest.mark.timeout(30)
def test_recompute_backward_matches_reference() -> None:
    """The CUDA backward's safety net (one SDPA recomputed with causal_lower_right) is exact as well."""
    q, k, v, dout = _inputs(8, 20, 4, 2, torch.float64, seed=6)
    ref = _reference(q, k, v, 20)
    for got, want in zip(recompute_backward(dout, q, k, v, 20), torch.autograd.grad(ref, (q, k, v), dout)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kv_heads", [4, 2])
@pytest.mark.parametrize("bounds", [[0, 5, 6, 30, 48], [0, 16, 32, 48], [0, 47, 48]])
def test_store_slices_match_unsliced(dtype, kv_heads, bounds) -> None:
    """Unequal slices through the K/V store (zero-copy window, dK/dV hand-down) equal one causal call."""
    s = bounds[-1]
    q, k, v, dout = _inputs(s, 0, 4, kv_heads, dtype, seed=1)
    ref = _reference(q, k, v, 0)
    want = torch.autograd.grad(ref, (q, k, v), dout)
    store = KVStore(bounds, MaskCache("auto"))
    leaves, outs = [], []
    for j in range(len(bounds) - 1):
        a, b = bounds[j], bounds[j + 1]
        qj, kj, vj = (x[:, a:b].detach().requires_grad_() for x in (q, k, v))
        outs.append(store.begin_forward(0, 0, j).layer(0).attend(qj, kj, vj))
        leaves.append((qj, kj, vj))
    for j in reversed(range(len(bounds) - 1)):
        store.begin_backward(0, 0, j)
        outs[j].backward(dout[:, bounds[j]:bounds[j + 1]])
        store.end_backward(0, 0, j)
    store.check_drained()
    tol = TOL[dtype]
    torch.testing.assert_close(torch.cat(outs, 1), ref, rtol=tol, atol=tol)
    for i, name in enumerate("qkv"):
        got = torch.cat([leaf[i].grad for leaf in leaves], 1)
        torch.testing.assert_close(got, want[i], rtol=tol, atol=tol, msg=lambda m, n=name: f"d{n}: {m}")


@pytest.mark.timeout(30)
def test_legacy_modes_agree_with_blocks() -> None:
    """table / bias (one SDPA call over the window) and the two-block path give the same slice."""
    q, k, v, _ = _inputs(8, 24, 4, 2, torch.float64, seed=2)
    outs = {mode: window_attention(q, k, v, 24, MaskCache(mode), 32) for mode in ("auto", "table", "bias")}
    assert "WindowBlocks" in type(outs["auto"].grad_fn).__name__
    assert "WindowBlocks" not in type(outs["table"].grad_fn).__name__
    for mode in ("table", "bias"):
        torch.testing.assert_close(outs[mode], outs["auto"], rtol=1e-12, atol=1e-12)


@pytest.mark.timeout(30)
def test_saved_tensors_are_window_views() -> None:
    """WindowBlocks saves q, out, lse and views of the K/V window buffer: no prefix copy, no mask."""
    buf = torch.randn(1, 32, 2, 8, dtype=torch.float64)  # (b, end, H_kv, d), the K/V store's buffer
    k_win = buf.detach().requires_grad_()  # shares buf's storage (a contiguous window)
    q = torch.randn(1, 8, 4, 8, dtype=torch.float64, requires_grad=True)
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x) or x, lambda x: x):
        WindowBlocks.apply(q, k_win, k_win, 24)
    buf_ptr = buf.untyped_storage().data_ptr()
    assert sum(x.untyped_storage().data_ptr() == buf_ptr for x in saved) == 2  # the K and V windows
    others = {x.untyped_storage().data_ptr(): x.untyped_storage().nbytes() for x in saved
              if x.untyped_storage().data_ptr() != buf_ptr}
    assert sorted(others.values()) == sorted([4 * 8 * 8, 8 * 4 * 8 * 8, 8 * 4 * 8 * 8])  # lse, q, out


@pytest.mark.timeout(30)
@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (4, 2)])
def test_block_helpers_causal_flag(heads, kv_heads) -> None:
    """exchange_attention's block_forward/backward with causal=True equal a masked block, on the CPU
    kernel (native GQA) and, for MHA, on the math fallback."""
    g = torch.Generator().manual_seed(3)
    q = torch.randn(1, heads, 12, 8, generator=g, dtype=torch.float64)
    k, v = (torch.randn(1, kv_heads, 12, 8, generator=g, dtype=torch.float64) for _ in range(2))
    hidden = ~torch.ones(12, 12, dtype=torch.bool).tril()
    mask = torch.zeros(12, 12, dtype=torch.float64).masked_fill_(hidden, float("-inf"))
    out, lse = block_forward(q, k, v, None, causal=True)
    want_out, want_lse = block_forward(q, k, v, mask)
    torch.testing.assert_close(out, want_out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse, want_lse, rtol=1e-12, atol=1e-12)
    dout = torch.randn(out.shape, generator=g, dtype=torch.float64)
    for a, b in zip(block_backward(dout, q, k, v, out, lse, None, causal=True),
                    block_backward(dout, q, k, v, out, lse, mask)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    if heads == kv_heads:
        math_out, math_lse = math_block_forward(q, k, v, mask)
        torch.testing.assert_close(math_out, out, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(math_lse, lse, rtol=1e-12, atol=1e-12)


@pytest.mark.gpu
@pytest.mark.timeout(120)
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("heads, kv_heads", [(8, 8), (8, 2)])
def test_window_blocks_cuda_bf16(heads, kv_heads) -> None:
    """CUDA: the FA2 two-block path (bf16) against the fp32 masked reference, forward and backward."""
    g = torch.Generator().manual_seed(4)
    t, start = 300, 700
    q = torch.randn(1, t, heads, 64, generator=g)
    k, v = (torch.randn(1, start + t, kv_heads, 64, generator=g) for _ in range(2))
    dout = torch.randn(1, t, heads, 64, generator=g)
    lo = [x.cuda().bfloat16().requires_grad_() for x in (q, k, v)]
    masks = MaskCache("auto")
    assert masks.uses_blocks(lo[0], lo[1])
    out = window_attention(*lo, start, masks, start + t)
    assert masks.cuda_blocks and "WindowBlocks" in type(out.grad_fn).__name__
    got = torch.autograd.grad(out, lo, dout.cuda().bfloat16())
    hi = [x.cuda().requires_grad_() for x in (q, k, v)]
    ref = _reference(*hi, start)
    want = torch.autograd.grad(ref, hi, dout.cuda())
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.float(), b, rtol=5e-2, atol=5e-2)
