"""Context parallelism composed with tensor + sequence parallelism (t = 2) on gloo, fp64, world ≤ 8.

Each slice is cut into 2c zig-zag pieces, each CP rank's two pieces are split over the t TP ranks (SP), and
the CP attention runs on the TP rank's H/t heads over the CP group of that TP rank. Every rank's gradients
(after the dp·cp all-reduce and the TP sum of replicated norm weights) are compared with its piece of the
unsliced single-process gradients (tests.support.shards.tp_piece) at 1e-10.
"""

from __future__ import annotations

import pytest
import torch

from slimpipe.runtime import ParallelState, PipelineRuntime
from slimpipe.schedule.builders import build
from tests.support.dist import run_dist
from tests.support.models import RTOL, TINY, unsliced_reference
from tests.support.shards import tp_piece

pytestmark = [pytest.mark.dist, pytest.mark.timeout(240)]

SEED, SEQ = 13, 32  # TINY: 4 query heads over 2 K/V heads, ffn 64, vocabulary 64: all divide by t = 2

# (schedule, n, m, v, tied, vocab_parallel, attn_balance, recompute) per layout (t, c, p)
GRID = {
    (2, 2, 1): [("slimpipe", 2, 2, 1, False, False, 0, "none"), ("slimpipe", 4, 2, 2, True, False, 0, "none"),
                ("1f1b", 1, 2, 1, False, True, 0, "none")],
    (2, 2, 2): [("slimpipe", 4, 2, 1, False, False, 0, "none"), ("slimpipe", 4, 2, 1, False, False, 100, "none"),
                ("slimpipe", 2, 2, 2, True, True, 0, "none"), ("slimpipe", 4, 2, 1, True, True, 100, "full"),
                ("interleaved-1f1b", 1, 4, 2, False, False, 0, "none")],
    (2, 4, 1): [("slimpipe", 2, 2, 1, False, False, 0, "none"), ("1f1b", 1, 2, 1, True, False, 0, "partial+fc1")],
}
WORLDS = {4: [(2, 2, 1)], 8: [(2, 2, 2), (2, 4, 1)]}


def _case(name: str, n: int, m: int, v: int, tied: bool, p: int):
    return TINY.replace(num_layers=max(2, p * v), tie_embeddings=tied), build(name, p=p, m=m, n=n, v=v)


def _tokens(rows: int) -> torch.Tensor:
    return torch.randint(0, TINY.vocab_size, (rows, SEQ + 1), generator=torch.Generator().manual_seed(rows))


def _worker(rank: int, world: int, layouts: list) -> dict:
    out = {}
    for t, c, p in layouts:
        state = ParallelState.create(pp=p, tp=t, cp=c, timeout_s=60.0)
        for case in GRID[(t, c, p)]:
            name, n, m, v, tied, vp, xb, recompute = case
            cfg, sched = _case(name, n, m, v, tied, p)
            rt = PipelineRuntime(cfg, sched, state, dtype=torch.float64, seed=SEED, vocab_parallel=vp,
                                 attn_balance=xb, recompute=recompute)
            res = rt.forward_backward(_tokens(m), reduce_grads=True)
            ex = rt.executor
            out[((t, c, p), case)] = dict(
                ranks=(state.pp_rank, state.tp_rank), loss=res.loss,
                grads={k: q.grad.clone() for k, q in rt.named_parameters()},
                trace_ok=[e.action for e in res.trace] == [str(a) for a in rt.schedule.ranks[state.pp_rank]],
                moved=0 if ex.exchange is None else ex.exchange.sent + ex.exchange.served,
                cp_bytes=ex.cp.comm.sent_bytes)
    return out


def _check(results: list[dict], layouts: list) -> int:
    checked = 0
    for layout in layouts:
        t, c, p = layout
        for case in GRID[layout]:
            name, n, m, v, tied, vp, xb, _ = case
            cfg, _ = _case(name, n, m, v, tied, p)
            ref_loss, ref = unsliced_reference(cfg, m, seq=SEQ, vocab=TINY.vocab_size, token_seed=m, seed=SEED)
            rows = [r[(layout, case)] for r in results]
            assert all(abs(r["loss"] - ref_loss) <= RTOL * abs(ref_loss) for r in rows), (layout, case)
            assert all(r["trace_ok"] and r["cp_bytes"] > 0 for r in rows), (layout, case)
            assert (sum(r["moved"] for r in rows) > 0) == (xb > 0), (layout, case)
            for r in rows:
                pp_rank, tp_rank = r["ranks"]
                assert set(r["grads"]) <= set(ref), (layout, case)
                for k, g in r["grads"].items():
                    want = tp_piece(k, ref[k], t=t, p=p, pp_rank=pp_rank, tp_rank=tp_rank, vocab_parallel=vp,
                                    vocab=cfg.vocab_size)
                    err = float((g - want).abs().max() / want.abs().max().clamp_min(1e-300))
                    assert err <= RTOL, f"{layout} {case} rank ({pp_rank}, {tp_rank}): {k} off by {err:.3g}"
            checked += 1
    return checked


@pytest.mark.parametrize("world", [4, 8])
def test_cp_with_tp_gradients(world: int) -> None:
    assert _check(run_dist(_worker, world, WORLDS[world], timeout_s=120.0), WORLDS[world]) == sum(
        len(GRID[lay]) for lay in WORLDS[world])


def test_grid_covers_the_issue() -> None:
    """≥ 30 pipeline configurations with c ∈ {2, 4}, t = 2, p = 2, n > 1, exchange on and off, world ≤ 8."""
    from tests.cp.test_cp_gloo import C2_P1_D2, C2_P2, C2_P2_D2, C4_P1, C4_P2

    plain = [((1, 2, 2, 1), c) for c in C2_P2] + [((1, 4, 1, 1), c) for c in C4_P1] + \
        [((1, 4, 2, 1), c) for c in C4_P2] + [((1, 2, 2, 2), c) for c in C2_P2_D2] + \
        [((1, 2, 1, 2), c) for c in C2_P1_D2]
    with_tp = [((t, c, p, 1), case) for (t, c, p), cases in GRID.items() for case in cases]
    every = plain + with_tp
    assert len(every) >= 30 and all(t * c * p * d <= 8 for (t, c, p, d), _ in every)
    assert {c for (_, c, _, _), _ in every} == {2, 4} and {t for (t, _, _, _), _ in every} == {1, 2}
    assert any(p == 2 and t == 2 for (t, _, p, _), _ in with_tp)
    for group in (plain, with_tp):  # exchange on and off, n > 1, with and without TP
        assert {bool(case[6]) for _, case in group} == {False, True}
        assert any(case[1 if group is with_tp else 2] > 1 for _, case in group)
