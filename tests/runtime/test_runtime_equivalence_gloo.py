"""Gradient equivalence with real processes on gloo: a representative subset of the grid.

Each test forks one process group and runs several configurations in it (amortising the fork and the
group setup); every rank returns its loss, its parameters' gradients (after the tied-embedding sum and the
DP all-reduce) and its executed trace, which the parent compares with the unsliced single-process
reference on the whole global batch and with the rank's lowered program.
"""

from __future__ import annotations

import functools

import pytest
import torch

from tests.support.dist import run_dist
from tests.support.models import RTOL, max_rel_error, model, tokens, unsliced_reference
from slimpipe.runtime import OptimConfig, ParallelState, PipelineRuntime, build_reference, reference_loss
from slimpipe.runtime.optim import build_optimizer
from slimpipe.schedule.builders import build
from slimpipe.schedule.passes import lower

pytestmark = pytest.mark.dist
SEED = 5
SEQ = 32

# (builder, p, n, m, v, tied, slice weights)
PP4 = [
    ("slimpipe", 4, 8, 2, 1, False, None), ("slimpipe", 4, 4, 2, 2, False, None),
    ("gpipe", 4, 2, 2, 2, False, None), ("1f1b", 4, 1, 4, 1, False, None),
    ("interleaved-1f1b", 4, 1, 4, 2, False, None), ("seq1f1b", 4, 4, 2, 1, False, (0.4, 0.3, 0.2, 0.1)),
    ("slimpipe", 4, 4, 3, 1, True, None), ("slimpipe", 4, 4, 3, 2, True, None),
]
PP2_DP2 = [
    ("slimpipe", 2, 4, 2, 2, False, None), ("1f1b", 2, 1, 2, 1, False, None),
    ("gpipe", 2, 4, 2, 1, False, None),
    ("interleaved-1f1b", 2, 1, 3, 2, False, None), ("seq1f1b", 2, 4, 2, 1, False, None),
    ("slimpipe", 2, 8, 3, 1, True, None),
]
PP2 = [
    ("slimpipe", 2, 2, 2, 2, False, None), ("seq1f1b", 2, 8, 2, 1, False, None),
    ("slimpipe", 2, 4, 2, 2, False, (0.4, 0.3, 0.2, 0.1)),  # --slice-split equal-flop shape, interleaved
    ("1f1b", 2, 1, 3, 1, True, None),
]
PP1_DP2 = [("slimpipe", 1, 4, 2, 2, False, None), ("gpipe", 1, 2, 1, 1, True, None)]


def _case_model(case):
    name, p, n, m, v, tied, weights = case
    return model(2 * p * v, tie_embeddings=tied), build(name, p=p, m=m, n=n, v=v, slice_weights=weights)


def _worker(rank: int, world: int, pp: int, cases: list) -> dict:
    state = ParallelState.create(pp=pp, dp=world // pp, timeout_s=60.0)
    out = {}
    for case in cases:
        cfg, sched = _case_model(case)
        m = sched.num_microbatches
        rt = PipelineRuntime(cfg, sched, state, dtype=torch.float64, seed=SEED)
        toks = tokens(m * state.dp, SEQ, seed=m * state.dp)[state.dp_rank * m : (state.dp_rank + 1) * m]
        res = rt.forward_backward(toks, reduce_grads=True)
        grads = {n: p.grad.clone() for n, p in rt.named_parameters()}
        out[case] = (state.pp_rank, res.loss, grads, [e.action for e in res.trace])
    return out


@functools.lru_cache(maxsize=None)
def _reference(case, dp: int):
    cfg, sched = _case_model(case)
    rows = sched.num_microbatches * dp
    return unsliced_reference(cfg, rows, seq=SEQ, token_seed=rows, seed=SEED)


def _check(results: list[dict], cases: list, dp: int) -> None:
    for case in cases:
        ref_loss, ref = _reference(case, dp)
        lowered = lower(_case_model(case)[1])
        names = set()
        for out in results:
            pp_rank, loss, grads, trace = out[case]
            assert abs(loss - ref_loss) <= RTOL * abs(ref_loss), (case, loss, ref_loss)
            err, worst = max_rel_error(grads, ref)
            assert err <= RTOL, f"{case} rank {pp_rank}: {worst} off by {err:.3g}"
            program = [str(a) for a in lowered.ranks[pp_rank]]
            assert trace == program, f"{case}: trace differs from the program"
            names |= set(grads)
        assert names == set(ref), case


@pytest.mark.timeout(120)
def test_pp4() -> None:
    _check(run_dist(_worker, 4, 4, PP4), PP4, dp=1)


@pytest.mark.timeout(120)
def test_pp2_dp2() -> None:
    _check(run_dist(_worker, 4, 2, PP2_DP2), PP2_DP2, dp=2)


@pytest.mark.timeout(120)
def test_pp2_and_pp1_dp2() -> None:
    _check(run_dist(_worker, 2, 2, PP2), PP2, dp=1)
    _check(run_dist(_worker, 2, 1, PP1_DP2), PP1_DP2, dp=2)


OPTIM = OptimConfig(lr=1e-2, weight_decay=0.1, clip=0.05)  # clip well below the norm: clipping is active
TRAIN_CASE = ("slimpipe", 2, 4, 2, 2, True, None)


def _train_worker(rank: int, world: int) -> tuple[int, float, list[float], dict]:
    state = ParallelState.create(pp=2, dp=2, timeout_s=60.0)
    cfg, sched = _case_model(TRAIN_CASE)
    rt = PipelineRuntime(cfg, sched, state, dtype=torch.float64, seed=SEED, optim=OPTIM)
    m = sched.num_microbatches
    losses, norm = [], 0.0
    for step in range(2):
        toks = tokens(2 * m, SEQ, seed=100 + step)[state.dp_rank * m : (state.dp_rank + 1) * m]
        res = rt.train_step(toks)
        losses.append(res.loss)
        norm = res.grad_norm
    return state.pp_rank, norm, losses, {n: p.detach().clone() for n, p in rt.named_parameters()}


@pytest.mark.timeout(120)
def test_train_step_matches_reference_adamw() -> None:
    """Two train steps (tied embeddings, pp 2 × dp 2): losses, grad norm and updated weights equal a
    single-process AdamW run with clip_grad_norm_ on the whole global batch."""
    cfg, sched = _case_model(TRAIN_CASE)
    ref = build_reference(cfg, seed=SEED, dtype=torch.float64)
    opt = build_optimizer(ref.named_parameters(), OPTIM)
    ref_losses = []
    for step in range(2):
        opt.zero_grad()
        loss = reference_loss(ref, tokens(2 * sched.num_microbatches, SEQ, seed=100 + step))
        loss.backward()
        ref_norm = float(torch.nn.utils.clip_grad_norm_(ref.parameters(), OPTIM.clip))
        opt.step()
        ref_losses.append(float(loss.detach()))
    ref_params = dict(ref.named_parameters())
    for pp_rank, norm, losses, params in run_dist(_train_worker, 4):
        assert losses == pytest.approx(ref_losses, rel=RTOL)
        assert norm == pytest.approx(ref_norm, rel=RTOL)
        for n, p in params.items():
            torch.testing.assert_close(p, ref_params[n].detach(), rtol=RTOL, atol=1e-12, msg=n)
