"""Context parallelism end to end on gloo: fp64 gradients equal the unsliced single-process model's.

Each test forks one process group (world ≤ 8) and runs many configurations in it; every rank returns its
loss, its gradients after the dp·cp all-reduce, its executed trace and what the exchange moved, and the
parent compares them with the unsliced reference on the whole global batch (float64: the layouts differ
only by summation order, ~1e-15 relative; a missing dK/dV term, a wrong RoPE position or a mis-normalised
loss shows up at ≥ 1e-3).
"""

from __future__ import annotations

import pytest
import torch

from slimpipe.config import ConfigError
from slimpipe.rules import sequence_problem
from slimpipe.runtime import ParallelState, PipelineRuntime
from tests.support.dist import run_dist
from tests.support.vocab import RTOL, case_model, case_tokens, full_grads, max_rel_error, reference

pytestmark = [pytest.mark.dist, pytest.mark.timeout(180)]

SEED = 7  # tests.support.vocab's reference seed


def _worker(rank: int, world: int, pp: int, cp: int, cases: list) -> dict:
    state = ParallelState.create(pp=pp, cp=cp, timeout_s=60.0)
    out = {}
    for case in cases:
        name, p, n, m, v, tied, balance, vocab, recompute, *offload = case
        cfg, sched = case_model(name, p, n, m, v, tied)
        rt = PipelineRuntime(cfg, sched, state, dtype=torch.float64, seed=SEED, attn_balance=balance,
                             vocab_parallel=vocab, recompute=recompute, offload=(offload or [0.0])[0])
        toks = case_tokens(m * state.dp)[state.dp_rank * m: (state.dp_rank + 1) * m]
        res = rt.forward_backward(toks, reduce_grads=True)
        ex = rt.executor
        moved = 0 if ex.exchange is None else ex.exchange.sent + ex.exchange.served
        program = [str(a) for a in rt.schedule.ranks[state.pp_rank]]
        out[case] = dict(coords=(state.dp_rank, state.cp_rank, state.pp_rank), loss=res.loss,
                         grads={k: q.grad.clone() for k, q in rt.named_parameters()},
                         trace_ok=[e.action for e in res.trace] == program, moved=moved,
                         cp_bytes=ex.cp.comm.sent_bytes if ex.cp is not None else 0)
    return out


def _check(results: list[dict], cases: list, dp: int) -> None:
    for case in cases:
        name, p, n, m, v, tied = case[:6]
        ref_loss, ref = reference(p * v, tied, m * dp)
        rows = [r[case] for r in results]
        assert all(abs(r["loss"] - ref_loss) <= RTOL * abs(ref_loss) for r in rows), (case, ref_loss)
        assert all(r["trace_ok"] for r in rows), f"{case}: a trace differs from its program"
        assert all(r["cp_bytes"] > 0 for r in rows), f"{case}: no CP traffic"
        if case[6]:
            assert sum(r["moved"] for r in rows) > 0, f"{case}: the exchange moved nothing"
        pipelines: dict[tuple[int, int], list] = {}
        for r in sorted(rows, key=lambda r: r["coords"]):
            pipelines.setdefault(r["coords"][:2], []).append(r["grads"])
        for coords, per_pp in pipelines.items():  # every (dp, cp) pipeline holds the full gradient
            grads = full_grads(per_pp)
            assert set(grads) == set(ref), case
            err, worst = max_rel_error(grads, ref)
            assert err <= RTOL, f"{case} pipeline {coords}: {worst} off by {err:.3g}"


# (builder, p, n, m, v, tied, attention-exchange threshold, vocab-parallel, recompute[, offload α])
C2_P2 = [
    ("slimpipe", 2, 2, 2, 1, False, 0, False, "none"), ("slimpipe", 2, 4, 2, 2, False, 0, False, "none"),
    ("slimpipe", 2, 4, 3, 1, True, 0, False, "none"), ("1f1b", 2, 1, 3, 1, False, 0, False, "none"),
    ("interleaved-1f1b", 2, 1, 4, 2, False, 0, False, "none"), ("gpipe", 2, 2, 2, 1, False, 0, False, "none"),
    ("seq1f1b", 2, 4, 2, 1, False, 0, False, "none"), ("slimpipe", 2, 8, 2, 1, False, 100, False, "none"),
    ("slimpipe", 2, 4, 2, 2, False, 1, False, "none"), ("slimpipe", 2, 4, 2, 1, True, 0, True, "none"),
    ("slimpipe", 2, 8, 2, 1, True, 100, True, "none"), ("slimpipe", 2, 4, 2, 1, False, 100, False, "full"),
    ("slimpipe", 2, 4, 2, 2, False, 0, False, "partial+fc1"),
    ("slimpipe", 2, 4, 2, 1, False, 0, False, "partial", 0.5),
]
C4_P1 = [
    ("slimpipe", 1, 2, 1, 1, False, 0, False, "none"), ("slimpipe", 1, 4, 2, 2, True, 0, False, "none"),
    ("1f1b", 1, 1, 2, 1, False, 0, False, "none"), ("slimpipe", 1, 4, 2, 1, False, 0, False, "full"),
    ("slimpipe", 1, 2, 2, 1, False, 0, False, "partial"),
]
C4_P2 = [
    ("slimpipe", 2, 2, 2, 1, False, 0, False, "none"), ("slimpipe", 2, 4, 2, 2, True, 0, False, "none"),
    ("slimpipe", 2, 4, 2, 1, False, 100, False, "none"), ("slimpipe", 2, 4, 2, 1, True, 100, True, "none"),
]
C2_P2_D2 = [
    ("slimpipe", 2, 4, 2, 2, True, 0, False, "none"), ("1f1b", 2, 1, 2, 1, False, 0, False, "none"),
    ("slimpipe", 2, 8, 2, 1, False, 100, True, "none"),
]
C2_P1_D2 = [("slimpipe", 1, 4, 2, 1, False, 0, False, "none"), ("gpipe", 1, 2, 1, 1, True, 0, False, "none")]


def test_c2_p2() -> None:
    _check(run_dist(_worker, 4, 2, 2, C2_P2), C2_P2, dp=1)


def test_c4_p1_and_c2_p1_d2() -> None:
    _check(run_dist(_worker, 4, 1, 4, C4_P1), C4_P1, dp=1)
    _check(run_dist(_worker, 4, 1, 2, C2_P1_D2), C2_P1_D2, dp=2)


def test_world8_c4_p2_and_c2_p2_d2() -> None:
    _check(run_dist(_worker, 8, 2, 4, C4_P2), C4_P2, dp=1)
    _check(run_dist(_worker, 8, 2, 2, C2_P2_D2), C2_P2_D2, dp=2)


def _bad_seq(rank: int, world: int) -> None:
    state = ParallelState.create(pp=1, cp=2, timeout_s=30.0)
    cfg, sched = case_model("slimpipe", 1, 4, 1, 1, False)
    PipelineRuntime(cfg, sched, state, dtype=torch.float64).forward_backward(torch.zeros(1, 25, dtype=torch.long))


def test_sequence_not_divisible_names_the_fix() -> None:
    with pytest.raises(Exception, match=r"--seq-len=24 is not a multiple of n=4 · 2c=4 = 16.*nearest: 32"):
        run_dist(_bad_seq, 2)
    assert "--slices 3" in sequence_problem(60, 4, 1, 2)  # the nearest slice count that works
    assert "--cp=4 needs at least 8 tokens" in sequence_problem(6, 1, 1, 4)
    assert "n=2 · 2c=4 · t=2 = 16" in sequence_problem(40, 2, 2, 2)
    with pytest.raises(ConfigError):
        raise ConfigError(sequence_problem(60, 4, 1, 2))
