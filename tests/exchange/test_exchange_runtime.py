"""Exchange math (block attention with lse, exact merge and backward split) and the local runtime grid."""

from __future__ import annotations

import pytest
import torch
from torch.nn.functional import scaled_dot_product_attention

from tests.support.models import RTOL, max_rel_error, model, reference_grads, tokens
from slimpipe.config import ConfigError
from slimpipe.runtime import LocalPipelineRuntime
from slimpipe.runtime.exchange import rank_roles, with_exchange
from slimpipe.runtime.block_attention import (
    block_backward, block_forward, causal_mask, group_queries, math_block_backward, math_block_forward, merge,
    ungroup,
)
from slimpipe.schedule.actions import EXCHANGE_KINDS, Kind
from slimpipe.schedule.builders import build
from slimpipe.schedule.exchange import add_exchange, exchanges
from slimpipe.schedule.passes import lower
from slimpipe.schedule.validate import ScheduleError

SEED = 7
# The required grid: v ∈ {1, 2}, p ∈ {2, 4}, n ∈ {4, 8}; m is the smallest the double warm-up allows.
GRID = [(p, n, v, 3 if (p, n, v) == (4, 4, 1) else 2) for p in (2, 4) for n in (4, 8) for v in (1, 2)]


def _qkv(t=6, start=10, heads=4, kv_heads=2, d=8):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, t, heads, d, generator=g, dtype=torch.float64)
    k = torch.randn(1, start + t, kv_heads, d, generator=g, dtype=torch.float64)
    v = torch.randn(1, start + t, kv_heads, d, generator=g, dtype=torch.float64)
    return q, k, v


def test_split_keys_merge_and_backward_are_exact():
    """Keys [0, 7) elsewhere, [7, end) here: merged forward and summed backward equal full causal SDPA."""
    q, k, v = _qkv()
    start, end, split = 10, 16, 7
    qs, ks, vs = (x.clone().requires_grad_() for x in (q, k, v))
    full = causal_mask(start, end, 0, 1, dtype=q.dtype, device=q.device)
    ref = scaled_dot_product_attention(qs.transpose(1, 2), ks.transpose(1, 2), vs.transpose(1, 2),
                                       attn_mask=full, enable_gqa=True).transpose(1, 2)
    dout = torch.randn_like(ref)
    ref.backward(dout)
    qg, kt, vt = group_queries(q, 2), k.transpose(1, 2), v.transpose(1, 2)
    mask = causal_mask(start, end, split, 2, dtype=q.dtype, device=q.device)
    o_l, l_l = block_forward(qg, kt[:, :, split:], vt[:, :, split:], mask)
    o_r, l_r = block_forward(qg, kt[:, :, :split], vt[:, :, :split], None)
    out, lse = merge(o_l, l_l, o_r, l_r)
    torch.testing.assert_close(ungroup(out, 4), ref.detach(), rtol=1e-12, atol=1e-12)
    dog = group_queries(dout, 2)
    dq_l, dk_l, dv_l = block_backward(dog, qg, kt[:, :, split:], vt[:, :, split:], out, lse, mask)
    dq_r, dk_r, dv_r = block_backward(dog, qg, kt[:, :, :split], vt[:, :, :split], out, lse, None)
    torch.testing.assert_close(ungroup(dq_l + dq_r, 4), qs.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.cat([dk_r, dk_l], 2).transpose(1, 2), ks.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.cat([dv_r, dv_l], 2).transpose(1, 2), vs.grad, rtol=1e-12, atol=1e-12)


def test_math_fallback_matches_the_cpu_kernel():
    q, k, v = _qkv()
    qg, kt, vt = group_queries(q, 2), k.transpose(1, 2), v.transpose(1, 2)
    mask = causal_mask(10, 16, 3, 2, dtype=q.dtype, device=q.device)
    kt, vt = kt[:, :, 3:], vt[:, :, 3:]
    out, lse = block_forward(qg, kt, vt, mask)
    out2, lse2 = math_block_forward(qg, kt, vt, mask)
    torch.testing.assert_close((out2, lse2), (out, lse), rtol=1e-12, atol=1e-12)
    dout = torch.randn_like(out)
    for a, b in zip(math_block_backward(dout, qg, kt, vt, out, lse, mask),
                    block_backward(dout, qg, kt, vt, out, lse, mask)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("p,n,v,m", GRID)
def test_local_runtime_gradients_with_exchange(p, n, v, m):
    cfg = model(p * v, tie_embeddings=(n == 8))
    sched = build("slimpipe", p=p, m=m, n=n, v=v)
    toks = tokens(m, seed=m + n)
    ref_loss, ref = reference_grads(cfg, toks, seed=SEED)
    rt = LocalPipelineRuntime(cfg, sched, dtype=torch.float64, seed=SEED, attn_balance=100)
    res = rt.forward_backward(toks, reduce_grads=True)
    assert abs(res.loss - ref_loss) <= RTOL * abs(ref_loss)
    err, worst = max_rel_error({name: q.grad for name, q in rt.named_parameters()}, ref)
    assert err <= RTOL, (worst, err)
    xs = exchanges(rt.schedule)
    assert xs, "the grid's schedules all have concurrent pairs to exchange"
    executed = [e.action for e in res.trace]
    assert sum(a.kind in EXCHANGE_KINDS for prog in rt.schedule.ranks for a in prog) == 2 * len(xs)
    assert sorted(executed) == sorted(str(a) for prog in rt.schedule.ranks for a in prog)
    sent = sum(ex.exchange.sent for ex in rt.executors)
    assert sent == sum(cfg.num_layers // (p * v) for _ in xs)  # every owner layer handed its block over


def test_roles_and_with_exchange():
    sched = build("slimpipe", p=4, m=2, n=8, v=1)
    marked = with_exchange(sched, 2)
    assert with_exchange(marked, 0) is marked and with_exchange(marked, 2) is marked
    with pytest.raises(ConfigError, match="already carries"):
        with_exchange(marked, 3)
    assert with_exchange(sched, 0) is sched
    roles = [rank_roles(marked, r) for r in range(4)]
    for x in exchanges(marked):
        own = roles[x.owner_rank][(x.owner.kind, x.owner.unit)]
        helper = roles[x.helper_rank][(x.helper.kind, x.helper.unit)]
        assert own.owner and not helper.owner
        assert own.partner == x.helper_rank and helper.partner == x.owner_rank
        assert own.volume == helper.volume == x.volume <= 2
    with pytest.raises(ConfigError, match="equal slices"):
        LocalPipelineRuntime(model(2), build("seq1f1b", p=2, m=2, n=4, slice_weights=(0.4, 0.3, 0.2, 0.1)),
                             attn_balance=1)


def test_unpaired_marker_fails_even_unvalidated():
    """check_schedule=False skips validate(), but the roles table still refuses a marker without partner."""
    marked = add_exchange(build("slimpipe", p=2, m=2, n=8, v=1), 100)
    x = next(x for x in exchanges(marked) if x.owner.kind is Kind.F)
    progs = [list(prog) for prog in marked.ranks]
    del progs[x.owner_rank][x.owner_marker]
    broken = marked.replace_ranks(tuple(map(tuple, progs)))
    with pytest.raises(ScheduleError, match="no matching"):
        LocalPipelineRuntime(model(2), lower(broken), dtype=torch.float64, check_schedule=False)
