"""Query-out CP attention on its own over per-slice K/V blocks: c forked gloo ranks against one causal SDPA
over the whole sequence."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch.nn.functional import scaled_dot_product_attention

from slimpipe.config import ConfigError
from slimpipe.runtime.context_parallel import ZigZag
from slimpipe.runtime.cp_attention import CPGroup, SliceGeometry, cp_attention
from tests.support.blocks import run_slices
from tests.support.dist import run_dist

B, H, HK, D = 1, 4, 2, 8


def _inputs(seq: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, seq, H, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, seq, HK, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, seq, HK, D, generator=g, dtype=torch.float64)
    dout = torch.randn(B, seq, H, D, generator=g, dtype=torch.float64)
    return q, k, v, dout


def _reference(seq: int) -> list[torch.Tensor]:
    q, k, v, dout = (x.requires_grad_() if i < 3 else x for i, x in enumerate(_inputs(seq)))
    out = scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                                       enable_gqa=True).transpose(1, 2)
    out.backward(dout)
    return [out.detach(), q.grad, k.grad, v.grad]


def _rank(rank: int, world: int, bounds: tuple[int, ...]) -> list[torch.Tensor]:
    """Slices in order over per-slice K/V blocks, backwards in reverse with the dK/dV hand-down."""
    zz = ZigZag(world, rank, bounds)
    pos = zz.positions()
    q, k, v, dout = (x[:, pos] for x in _inputs(bounds[-1]))
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    comm = CPGroup(dist.group.WORLD, world, rank)

    def attend(j, qj, kj, vj, window):
        return cp_attention(qj, kj, vj, window, SliceGeometry(piece=zz.piece(j), rank=rank, size=world), comm)

    out, _ = run_slices(attend, q, k, v, zz.local_bounds(), dout)
    return [pos, out, q.grad, k.grad, v.grad]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("c, bounds", [(2, (0, 16, 32)), (2, (0, 8, 16, 24, 32)), (4, (0, 16, 32)),
                                       (4, (0, 32)), (2, (0, 8, 32))])
def test_query_out_matches_causal_attention(c: int, bounds: tuple[int, ...]) -> None:
    ref = _reference(bounds[-1])
    for pos, *got in run_dist(_rank, c, bounds):
        for name, g, r in zip(("out", "dq", "dk", "dv"), got, ref):
            torch.testing.assert_close(g, r[:, pos], rtol=1e-10, atol=1e-12, msg=name)


def test_zigzag_layout() -> None:
    zz = ZigZag(2, 1, (0, 8, 16))
    assert zz.positions().tolist() == [2, 3, 4, 5, 10, 11, 12, 13]
    assert zz.local_bounds() == [0, 4, 8]
    toks = torch.arange(17)[None]
    ids, labels = zz.take(toks)
    assert ids.tolist() == [[2, 3, 4, 5, 10, 11, 12, 13]] and labels.tolist() == [[3, 4, 5, 6, 11, 12, 13, 14]]
    with pytest.raises(ConfigError, match="multiple of 2c = 4"):
        ZigZag(2, 0, (0, 6, 16))


@pytest.mark.parametrize("causal", [False, True])
def test_math_blocks_match_the_fused_kernel(causal: bool) -> None:
    """The non-CPU path (explicit matmuls, K/V heads expanded) against ATen's CPU flash kernel."""
    from slimpipe.runtime.cp_attention import _kernel_bwd, _kernel_fwd

    g = torch.Generator().manual_seed(1)
    q, dout = (torch.randn(1, H, 6, D, generator=g, dtype=torch.float64) for _ in range(2))
    k, v = (torch.randn(1, HK, 6, D, generator=g, dtype=torch.float64) for _ in range(2))
    fused, math = _kernel_fwd(q, k, v, causal, fused=True), _kernel_fwd(q, k, v, causal, fused=False)
    for a, b in zip(fused, math):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    out, lse = fused
    for a, b in zip(_kernel_bwd(dout, q, k, v, out, lse, causal, fused=True),
                    _kernel_bwd(dout, q, k, v, out, lse, causal, fused=False)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
