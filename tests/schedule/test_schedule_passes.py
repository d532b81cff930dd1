"""lower() and dry_run(): placement of SEND/RECV, idempotence, timing against the closed forms."""

from __future__ import annotations

import pytest
from tests.support.schedule import act

from slimpipe.schedule import Kind, dry_run, lower, validate
from slimpipe.schedule.actions import COMM_KINDS, Schedule
from slimpipe.schedule.builders import build
from slimpipe.schedule.passes import inflight_curve, peak_inflight, uniform_duration


def test_lower_1f1b_p2_by_hand() -> None:
    low = lower(build("1f1b", p=2, m=2))
    assert [str(a) for a in low.ranks[0]] == [
        "0F0.0", "0SEND_F0.0", "0F1.0", "0SEND_F1.0", "0RECV_B0.0", "0B0.0", "0RECV_B1.0", "0B1.0",
    ]
    assert [str(a) for a in low.ranks[1]] == [
        "1RECV_F0.0", "1F0.0", "1B0.0", "1SEND_B0.0", "1RECV_F1.0", "1F1.0", "1B1.0", "1SEND_B1.0",
    ]


@pytest.mark.parametrize(("name", "p", "m", "n", "v"), [
    ("1f1b", 4, 5, 1, 1), ("slimpipe", 3, 2, 4, 1), ("slimpipe", 4, 2, 8, 2),
    ("interleaved-1f1b", 2, 4, 1, 3),
    ("seq1f1b", 2, 3, 4, 1), ("gpipe", 3, 2, 2, 2),
])
def test_lowering_places_each_message_next_to_its_compute(name: str, p: int, m: int, n: int, v: int) -> None:
    sched = build(name, p=p, m=m, n=n, v=v)
    low = lower(sched)
    last = sched.num_stages - 1
    compute_of = {Kind.SEND_F: Kind.F, Kind.RECV_F: Kind.F, Kind.SEND_B: Kind.B, Kind.RECV_B: Kind.B}
    for prog in low.ranks:
        for i, a in enumerate(prog):
            if a.kind in compute_of:  # SEND right after its compute, RECV right before
                nb = prog[i - 1] if a.kind in (Kind.SEND_F, Kind.SEND_B) else prog[i + 1]
                assert nb.unit == a.unit and nb.kind is compute_of[a.kind]
    count = {k: sum(a.kind is k for prog in low.ranks for a in prog) for k in COMM_KINDS}
    # p > 1: every stage handoff crosses ranks; stage 0 receives no activation, the last stage no gradient.
    for k in COMM_KINDS:
        assert count[k] == last * m * n
    assert low.compute_only() == sched
    assert lower(low) is low


def test_lowering_p1_needs_no_communication() -> None:
    sched = build("slimpipe", p=1, m=2, n=4, v=3)
    assert lower(sched) == sched
    assert not lower(sched).is_lowered


def test_lowering_rank0_first_stage_and_last_stage() -> None:
    low = lower(build("slimpipe", p=2, m=2, n=2, v=2))
    assert act("0RECV_F0.0") not in low.ranks[0]  # stage 0: input from the embedding, not a peer
    assert act("3RECV_B0.0") not in low.ranks[1]  # last stage: gradient from the loss
    assert act("2RECV_F0.0") in low.ranks[0] and act("1RECV_B0.0") in low.ranks[1]  # the wrap-around hop


@pytest.mark.parametrize("name", ["gpipe", "1f1b", "interleaved-1f1b", "seq1f1b", "slimpipe"])
@pytest.mark.parametrize("p", [1, 2, 4])
def test_uniform_makespan_matches_closed_form_for_v1(name: str, p: int) -> None:
    # F = 1, B = 2, free communication: makespan 3·(m·n + p − 1), i.e. bubble (p−1)/(m·n+p−1).
    for m in (p, 2 * p + 1):
        for n in ((1,) if name in ("1f1b", "interleaved-1f1b") else (1, 4)):
            res = dry_run(build(name, p=p, m=m, n=n))
            assert res.makespan == 3 * (m * n + p - 1)
            assert res.bubble_ratio() == pytest.approx((p - 1) / (m * n + p - 1))


@pytest.mark.parametrize(("name", "p", "m", "n", "v", "bubble"), [
    ("slimpipe", 4, 2, 8, 1, 0.15789),  # reference §4.2: 15.8 %
    ("slimpipe", 4, 2, 8, 2, 0.08571),  # reference §4.3: 8.57 %
    ("interleaved-1f1b", 4, 8, 1, 2, 3 / 19),
])
def test_reference_bubbles(name: str, p: int, m: int, n: int, v: int, bubble: float) -> None:
    res = dry_run(build(name, p=p, m=m, n=n, v=v))
    assert res.bubble_ratio() == pytest.approx(bubble, abs=5e-5)
    assert res.bubble_ratio() == pytest.approx((p - 1) / (m * n * v + p - 1))


def test_dry_run_times_follow_programs_and_dependencies() -> None:
    res = dry_run(build("slimpipe", p=3, m=3, n=2, v=2))
    low = res.schedule
    end_of = {}
    for r, prog in enumerate(low.ranks):
        for i, a in enumerate(prog):
            assert res.end[r][i] - res.start[r][i] == uniform_duration(a)
            if i:
                assert res.start[r][i] >= res.end[r][i - 1]
            end_of[(a.kind, a.unit)] = res.end[r][i]
    for r, prog in enumerate(low.ranks):
        for i, a in enumerate(prog):
            if a.kind is Kind.RECV_F:
                assert res.start[r][i] >= end_of[(Kind.SEND_F, (a.stage - 1, a.microbatch, a.seq_slice))]
            if a.kind is Kind.F and a.seq_slice > 0:
                assert res.start[r][i] >= end_of[(Kind.F, (a.stage, a.microbatch, a.seq_slice - 1))]
    assert res.makespan == max(max(e) for e in res.end)
    assert res.busy() == tuple(3.0 * 2 * 3 * 2 for _ in range(3))  # v·m·n units × (1 + 2) per rank


def test_latency_delays_receives_only() -> None:
    sched = build("gpipe", p=2, m=1)
    assert dry_run(sched).makespan == 6
    assert dry_run(sched, latency=0.5).makespan == 7  # one activation hop and one gradient hop
    custom = dry_run(sched, duration=lambda a: {Kind.F: 2.0, Kind.B: 3.0}.get(a.kind, 0.0))
    assert custom.makespan == 10


def test_inflight_curve_and_peaks() -> None:
    sched = build("1f1b", p=4, m=6)
    assert peak_inflight(sched) == (4, 3, 2, 1)
    assert inflight_curve(sched, 3)[:4] == [1, 0, 1, 0]
    assert peak_inflight(lower(sched)) == peak_inflight(sched)  # communication holds no activations


def test_empty_dry_run_is_harmless() -> None:
    empty = Schedule(name="custom", num_ranks=1, virtual_stages=1, num_microbatches=1, num_slices=1,
                     ranks=((),))
    assert dry_run(empty).makespan == 0 and dry_run(empty).bubble_ratio() == 0.0


def test_headline_schedule_validates_with_its_bubble() -> None:
    # The 2048K headline shape: p16 n64 v5 m4 → 40,960 compute actions, ~122k lowered; bubble 1.16 %.
    low = lower(build("slimpipe", p=16, m=4, n=64, v=5))
    assert sum(map(len, low.ranks)) == 40960 + 4 * (16 * 5 - 1) * 4 * 64
    validate(low)
    assert dry_run(low).bubble_ratio() == pytest.approx(15 / (4 * 64 * 5 + 15))
