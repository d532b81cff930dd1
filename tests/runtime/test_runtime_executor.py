"""The executor follows its program and fails loudly: traces, negative controls, deadlocks, dead peers."""

from __future__ import annotations

import time

import pytest
import torch
from torch.multiprocessing import ProcessRaisedException

from tests.support.dist import run_dist
from tests.support.models import model, tokens
from slimpipe.runtime import KVOrderError, LocalPipelineRuntime, ParallelState, PipelineError, PipelineRuntime
from slimpipe.schedule.actions import Action, Kind, Schedule
from slimpipe.schedule.builders import build
from slimpipe.schedule.passes import lower
from slimpipe.schedule.validate import ScheduleError


def _fifo(sched: Schedule) -> Schedule:
    """The same schedule with every (stage, micro-batch)'s slice backwards in FIFO order (0, 1, …)."""
    ranks = []
    for prog in sched.ranks:
        order: dict[tuple[int, int], list[int]] = {}
        for a in prog:
            if a.kind is Kind.B:
                order.setdefault((a.stage, a.microbatch), []).append(a.seq_slice)
        nxt = {key: iter(sorted(js)) for key, js in order.items()}
        ranks.append(tuple(Action(a.stage, a.kind, a.microbatch, next(nxt[(a.stage, a.microbatch)]))
                           if a.kind is Kind.B else a for a in prog))
    return sched.replace_ranks(tuple(ranks))


@pytest.mark.timeout(30)
@pytest.mark.parametrize("name, p, n, m, v", [
    ("slimpipe", 2, 4, 2, 2), ("gpipe", 4, 8, 2, 1), ("1f1b", 4, 1, 4, 1), ("slimpipe", 1, 4, 2, 2),
])
def test_trace_equals_lowered_program(name, p, n, m, v) -> None:
    sched = build(name, p=p, m=m, n=n, v=v)
    rt = LocalPipelineRuntime(model(2 * p * v), sched, dtype=torch.float64)
    res = rt.forward_backward(tokens(m))
    lowered = lower(sched)
    for r in range(p):
        assert [e.action for e in res.trace if e.rank == r] == [str(a) for a in lowered.ranks[r]]
        assert all(e.end_s >= e.start_s for e in res.trace)


@pytest.mark.timeout(30)
def test_fifo_slice_backward_rejected_before_execution() -> None:
    with pytest.raises(ScheduleError):
        LocalPipelineRuntime(model(4), _fifo(build("slimpipe", p=2, m=2, n=4)))


@pytest.mark.timeout(30)
def test_fifo_slice_backward_rejected_during_execution() -> None:
    """Without the validator the K/V store still refuses: no silently wrong gradient."""
    rt = LocalPipelineRuntime(model(4), _fifo(build("slimpipe", p=2, m=2, n=4)), check_schedule=False)
    with pytest.raises(PipelineError, match="out of reverse order") as info:
        rt.forward_backward(tokens(2))
    assert isinstance(info.value.__cause__, KVOrderError)
    msg = str(info.value)
    assert "rank 1 step 0" in msg and "ERROR HERE" in msg and "1B0.0" in msg


@pytest.mark.timeout(30)
def test_leftover_kv_state_raises() -> None:
    sched = build("slimpipe", p=1, m=2, n=4)
    prog = [a for a in sched.ranks[0] if not (a.kind is Kind.B and a.microbatch == 1 and a.seq_slice == 0)]
    rt = LocalPipelineRuntime(model(2), sched.replace_ranks((tuple(prog),)), check_schedule=False)
    with pytest.raises(PipelineError, match="left over at the end of the step"):
        rt.forward_backward(tokens(2))


@pytest.mark.timeout(30)
def test_unknown_kind_raises() -> None:
    sched = build("slimpipe", p=1, m=1, n=2)
    prog = sched.ranks[0] + (Action(0, Kind.W, 0, 0),)
    rt = LocalPipelineRuntime(model(2), sched.replace_ranks((prog,)), check_schedule=False)
    with pytest.raises(PipelineError, match="no handler for W"):
        rt.forward_backward(tokens(1))


@pytest.mark.timeout(30)
def test_local_deadlock_detected() -> None:
    lowered = lower(build("1f1b", p=2, m=1))
    r0 = lowered.ranks[0]
    recv = next(a for a in r0 if a.kind is Kind.RECV_B)
    bad = lowered.replace_ranks(((recv,) + tuple(a for a in r0 if a != recv), lowered.ranks[1]))
    rt = LocalPipelineRuntime(model(2), bad, check_schedule=False)
    with pytest.raises(PipelineError, match="deadlock"):
        rt.forward_backward(tokens(1))


def _dead_peer(rank: int, world: int, how: str) -> None:
    state = ParallelState.create(pp=2, dp=1, timeout_s=1.5)
    rt = PipelineRuntime(model(2), build("1f1b", p=2, m=2), state, dtype=torch.float64)
    if rank == 1:  # rank 1 never joins the step: it exits, or stays alive without answering
        if how == "hang":
            time.sleep(4.0)
        return
    t0 = time.time()
    try:
        rt.forward_backward(tokens(2))
    finally:
        assert time.time() - t0 < 3.5, "the group timeout did not bound the wait"


@pytest.mark.dist
@pytest.mark.timeout(60)
@pytest.mark.parametrize("how", ["exit", "hang"])
def test_dead_peer_is_an_error(how: str) -> None:
    with pytest.raises(ProcessRaisedException, match="rank 0 step 0: action 4 \\(0RECV_B0.0\\) failed"):
        run_dist(_dead_peer, 2, how, timeout_s=10.0)
