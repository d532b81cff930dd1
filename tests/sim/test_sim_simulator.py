"""Discrete-event simulator on hand-built lowered schedules: exact timings, latency, deadlock detection."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from slimpipe.schedule.actions import Kind, Schedule, parse_action
from slimpipe.schedule.builders import build
from slimpipe.schedule.passes import lower
from slimpipe.sim import DeadlockError, UniformCost, simulate


def _sched(rows: list[str], *, p: int, m: int, n: int = 1, v: int = 1) -> Schedule:
    ranks = tuple(tuple(parse_action(x) for x in row.split()) for row in rows)
    return Schedule(name="custom", num_ranks=p, virtual_stages=v, num_microbatches=m, num_slices=n,
                    ranks=ranks)


@dataclass(frozen=True)
class _Latency:
    """Uniform compute with a fixed transfer latency."""

    latency: float
    name: str = "latency"

    def compute_time(self, kind, stage, seq_slice):
        return 2.0 if kind is Kind.B else 1.0

    def transfer_time(self, kind, stage, seq_slice):
        return self.latency

    def step_overhead(self):
        return 0.0


def test_two_rank_timeline_by_hand() -> None:
    sched = _sched([
        "0F0.0 0SEND_F0.0 0F1.0 0SEND_F1.0 0RECV_B0.0 0B0.0 0RECV_B1.0 0B1.0",
        "1RECV_F0.0 1F0.0 1B0.0 1SEND_B0.0 1RECV_F1.0 1F1.0 1B1.0 1SEND_B1.0",
    ], p=2, m=2)
    tl = simulate(sched, UniformCost())
    # rank 1: F0 [1,2], B0 [2,4], F1 [4,5] (input ready at 2), B1 [5,7]; rank 0: B0 [4,6], B1 [7,9].
    assert [tl.start[1][i] for i in (1, 2, 5, 6)] == [1, 2, 4, 5]
    assert [tl.start[0][i] for i in (5, 7)] == [4, 7]
    assert tl.makespan == 9 and tl.busy == (6, 6)
    assert tl.bubble_ratio == pytest.approx(1 - 12 / 18)
    lat = simulate(sched, _Latency(0.5))
    assert lat.start[1][1] == 1.5  # F0 on rank 1 waits for the transfer
    # Critical path: F0 on rank 0, hop, rank 1 runs F0 B0 F1 B1 back to back (6), hop, B1 on rank 0.
    assert lat.makespan == 1 + 0.5 + 6 + 0.5 + 2


def test_compute_only_schedules_are_lowered_first() -> None:
    sched = build("slimpipe", p=3, m=3, n=2)
    assert simulate(sched, UniformCost()).makespan == simulate(lower(sched), UniformCost()).makespan


def test_deadlock_names_the_stuck_actions() -> None:
    # Both ranks wait for each other's backward gradient / forward activation before sending anything.
    sched = _sched([
        "0RECV_B0.0 0F0.0 0SEND_F0.0 0B0.0",
        "1RECV_F0.0 1F0.0 1B0.0 1SEND_B0.0",
    ], p=2, m=1)
    with pytest.raises(DeadlockError) as exc:
        simulate(sched, UniformCost())
    msg = str(exc.value)
    assert "rank 0 at step 0 0RECV_B0.0 waits for 1SEND_B0.0 on rank 1" in msg
    assert "rank 1 at step 0 1RECV_F0.0 waits for 0SEND_F0.0 on rank 0" in msg


def test_missing_send_is_a_deadlock() -> None:
    sched = _sched(["0F0.0 0B0.0", "1RECV_F0.0 1F0.0 1B0.0"], p=2, m=1)
    with pytest.raises(DeadlockError, match="1RECV_F0.0 waits for 0SEND_F0.0"):
        simulate(sched, UniformCost())


def test_compute_events_and_busy_agree() -> None:
    tl = simulate(build("slimpipe", p=4, m=2, n=8, v=2), UniformCost())
    for r in range(4):
        events = tl.compute_events(r)
        assert len(events) == 2 * 2 * 8 * 2
        assert sum(e - s for _, s, e in events) == tl.busy[r]
        assert all(e1 <= s2 for (_, _, e1), (_, s2, _) in zip(events, events[1:]))  # one stream per rank
