"""Gradient equivalence with the attention exchange on real processes (gloo): the helper really computes.

Each test forks one process group and runs the grid's configurations in it. Every rank returns its loss,
its gradients (after the tied-embedding sum), its executed trace and how many blocks it handed over and
served; the parent checks loss and every gradient against the unsliced single-process reference (float64,
1e-10 relative, see tests.support.models.RTOL), the trace against the rank's marked program, and that each
owner block was served by its helper (sent on one side = served on the other, per exchange and layer).
"""

from __future__ import annotations

import functools

import pytest
import torch

from tests.support.dist import run_dist
from tests.support.models import RTOL, max_rel_error, model, tokens, unsliced_reference
from slimpipe.runtime import ParallelState, PipelineRuntime
from slimpipe.runtime.exchange import with_exchange
from slimpipe.schedule.builders import build
from slimpipe.schedule.exchange import exchanges

pytestmark = [pytest.mark.dist, pytest.mark.timeout(240)]
SEED = 11
# (p, n, v, m, dp): the required grid v ∈ {1, 2}, p ∈ {2, 4}, n ∈ {4, 8}, plus one pp 2 × dp 2 case.
P2 = [(2, 4, 1, 2, 1), (2, 8, 1, 2, 1), (2, 4, 2, 2, 1), (2, 8, 2, 2, 1)]
P4 = [(4, 4, 1, 3, 1), (4, 8, 1, 2, 1), (4, 4, 2, 2, 1), (4, 8, 2, 2, 1), (2, 8, 2, 2, 2)]


def _case(case):
    p, n, v, m, _ = case
    return model(p * v, tie_embeddings=(n == 4)), build("slimpipe", p=p, m=m, n=n, v=v)


def _worker(rank: int, world: int, cases: list) -> dict:
    out = {}
    states: dict[int, ParallelState] = {}
    for case in cases:
        p, dp = case[0], case[4]
        if p not in states:  # new_group is collective: every rank creates the same states in order
            states[p] = ParallelState.create(pp=p, dp=dp, timeout_s=60.0)
        state = states[p]
        cfg, sched = _case(case)
        m = sched.num_microbatches
        rt = PipelineRuntime(cfg, sched, state, dtype=torch.float64, seed=SEED, attn_balance=100)
        toks = tokens(m * dp, seed=m * dp)[state.dp_rank * m : (state.dp_rank + 1) * m]
        res = rt.forward_backward(toks, reduce_grads=True)
        ex = rt.executor.exchange
        out[case] = (state.pp_rank, res.loss, {n: q.grad.clone() for n, q in rt.named_parameters()},
                     [e.action for e in res.trace], ex.sent, ex.served)
    return out


@functools.lru_cache(maxsize=None)
def _reference(case):
    cfg, sched = _case(case)
    rows = sched.num_microbatches * case[4]
    return unsliced_reference(cfg, rows, token_seed=rows, seed=SEED)


def _check(results: list[dict], cases: list) -> None:
    for case in cases:
        ref_loss, ref = _reference(case)
        cfg, sched = _case(case)
        marked = with_exchange(sched, 100)
        xs = exchanges(marked)
        assert xs
        layers = cfg.num_layers // (case[0] * case[2])
        sent = served = 0
        for out in results:
            pp_rank, loss, grads, trace, s, v = out[case]
            assert abs(loss - ref_loss) <= RTOL * abs(ref_loss), (case, loss, ref_loss)
            err, worst = max_rel_error(grads, ref)
            assert err <= RTOL, (case, pp_rank, worst, err)
            lowered = [str(a) for a in marked.ranks[pp_rank]]
            assert trace == lowered, (case, pp_rank)
            sent, served = sent + s, served + v
        assert sent == served == case[4] * layers * len(xs), (case, sent, served)


def test_gloo_exchange_pp2():
    _check(run_dist(_worker, 2, P2, timeout_s=120.0), P2)


def test_gloo_exchange_pp4_and_dp2():
    _check(run_dist(_worker, 4, P4, timeout_s=120.0), P4)
