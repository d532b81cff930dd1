"""Negative controls: each hand-broken schedule fails its named check, with the grid marked.

Each case starts from a valid built schedule and makes one edit; the edit must be caught by the check
that owns that invariant (called directly) and by validate() (which reports that same check first).
"""

from __future__ import annotations

import pytest
from tests.support.schedule import act, with_program

from slimpipe.schedule import Kind, ScheduleError, dry_run, lower, validate
from slimpipe.schedule.actions import Action, Schedule
from slimpipe.schedule.builders import build
from slimpipe.schedule.validate import (
    CHECKS,
    check_comm_matching,
    check_counts,
    check_f_before_b,
    check_metadata,
    check_microbatch_backward_after_forwards,
    check_pipeline_order,
    check_slice_order,
    check_stage_placement,
)


def _fails(check, sched: Schedule, *fragments: str) -> ScheduleError:
    """check(sched) and validate(sched) both raise, naming check; the message holds every fragment."""
    with pytest.raises(ScheduleError) as direct:
        check(sched)
    assert direct.value.check == check.__name__
    with pytest.raises(ScheduleError) as via_validate:
        validate(sched)
    assert via_validate.value.check == check.__name__
    msg = str(direct.value)
    assert msg.startswith(check.__name__ + ":")
    assert "<-- ERROR HERE" in msg or not direct.value.marks
    for frag in fragments:
        assert frag in msg, (frag, msg)
    return direct.value


def _fifo_backward(sched: Schedule, rank: int, stage: int, mb: int) -> Schedule:
    """Rewrite (stage, mb)'s backwards on rank to run slices 0..n−1 in the same program positions."""
    prog = list(sched.ranks[rank])
    idx = [i for i, a in enumerate(prog) if a.kind is Kind.B and (a.stage, a.microbatch) == (stage, mb)]
    for pos, j in zip(idx, range(sched.num_slices)):
        prog[pos] = Action(stage, Kind.B, mb, j)
    return with_program(sched, rank, prog)


def test_fifo_slice_backward_is_rejected_with_a_marked_grid() -> None:
    good = build("slimpipe", p=2, m=2, n=4)
    bad = _fifo_backward(good, rank=0, stage=0, mb=0)
    # What generic validators check still holds: counts, F before B, micro-batch backward after forwards.
    for check in (check_stage_placement, check_counts, check_f_before_b,
                  check_microbatch_backward_after_forwards):
        check(bad)
    err = _fails(check_slice_order, bad, "reverse slice order", "0B0.1", "*0B0.1")
    step = bad.ranks[0].index(act("0B0.1"))
    assert err.marks == ((0, step),)
    marked_row = next(line for line in err.grid.splitlines() if line.startswith("rank0"))
    assert marked_row.endswith(f"<-- ERROR HERE (step {step})")


def test_fifo_slice_backward_is_rejected_on_interleaved_slimpipe() -> None:
    good = build("slimpipe", p=4, m=2, n=8, v=2)
    _fails(check_slice_order, _fifo_backward(good, rank=2, stage=6, mb=1), "6B1.1")


def test_reversed_slice_forward_is_rejected() -> None:
    good = build("slimpipe", p=2, m=2, n=2)
    prog = list(good.ranks[1])
    i, k = prog.index(act("1F1.0")), prog.index(act("1F1.1"))
    prog[i], prog[k] = prog[k], prog[i]
    _fails(check_slice_order, with_program(good, 1, prog), "slice order 0..n−1", "1F1.0")


def test_missing_unit() -> None:
    good = build("1f1b", p=3, m=4)
    prog = [a for a in good.ranks[1] if a != act("1B2.0")]
    err = _fails(check_counts, with_program(good, 1, prog), "1B2.0 is missing on rank 1")
    assert err.marks == ()


def test_duplicated_action() -> None:
    good = build("seq1f1b", p=2, m=3, n=2)
    prog = list(good.ranks[0])
    prog.insert(5, act("0F0.1"))
    err = _fails(check_counts, with_program(good, 0, prog), "0F0.1 runs twice")
    assert err.marks == ((0, 1), (0, 5))


def test_action_off_the_unit_grid() -> None:
    good = build("1f1b", p=2, m=2)
    prog = list(good.ranks[0]) + [act("0F2.0"), act("0B2.0")]
    _fails(check_counts, with_program(good, 0, prog), "outside the unit grid")


def test_backward_before_forward() -> None:
    good = build("1f1b", p=4, m=4)
    prog = list(good.ranks[3])
    assert prog[:2] == [act("3F0"), act("3B0")]
    prog[0], prog[1] = prog[1], prog[0]
    err = _fails(check_f_before_b, with_program(good, 3, prog), "3B0.0 runs before 3F0.0")
    assert err.marks == ((3, 0), (3, 1))


def test_stage_on_wrong_rank() -> None:
    good = build("interleaved-1f1b", p=2, m=4, v=2)
    ranks = [list(prog) for prog in good.ranks]
    ranks[1].remove(act("3F2.0"))
    ranks[0].insert(10, act("3F2.0"))
    bad = good.replace_ranks(tuple(map(tuple, ranks)))
    _fails(check_stage_placement, bad, "stage 3, which lives on rank 1", "*3F2.0")


def test_stage_out_of_range() -> None:
    good = build("1f1b", p=2, m=2)
    _fails(check_stage_placement, with_program(good, 0, [*good.ranks[0], act("4F0")]), "outside [0, p·v = 2)")


def test_microbatch_backward_before_its_last_forward() -> None:
    # Per-slice F/B pairs in slice order would satisfy F-before-B per unit, but slice 0's backward
    # needs every later slice's K/V gradient: the micro-batch's backward must wait for its last forward.
    sched = Schedule(
        name="custom", num_ranks=1, virtual_stages=1, num_microbatches=1, num_slices=2,
        ranks=((act("0F0.0"), act("0F0.1"), act("0B0.1"), act("0B0.0")),),
    )
    validate(sched)
    bad = sched.replace_ranks(((act("0F0.0"), act("0B0.0"), act("0F0.1"), act("0B0.1")),))
    with pytest.raises(ScheduleError) as err:
        check_microbatch_backward_after_forwards(bad)
    assert "before its last forward" in str(err.value)


def test_weight_gradient_actions() -> None:
    good = build("1f1b", p=2, m=2)
    def add_w(prog: tuple[Action, ...]) -> tuple[Action, ...]:
        out: list[Action] = []
        for a in prog:
            out += [a, Action(a.stage, Kind.W, a.microbatch)] if a.kind is Kind.B else [a]
        return tuple(out)

    with_w = good.replace_ranks(tuple(add_w(prog) for prog in good.ranks))
    validate(with_w)
    validate(lower(with_w))
    dry_run(with_w)
    # W before its B.
    prog = list(with_w.ranks[0])
    i = prog.index(act("0W1"))
    prog.insert(prog.index(act("0B1")), prog.pop(i))
    _fails(check_f_before_b, with_program(with_w, 0, prog), "0W1.0 runs before 0B1.0")
    # W used for some units but not all.
    _fails(check_counts, with_program(with_w, 1, [a for a in with_w.ranks[1] if a != act("1W0")]),
           "1W0.0 is missing", "W is used")


def test_metadata() -> None:
    good = build("1f1b", p=2, m=2)
    bad = Schedule(name="x", num_ranks=3, virtual_stages=1, num_microbatches=2, num_slices=1,
                   ranks=good.ranks)
    _fails(check_metadata, bad, "num_ranks=3 but 2 rank programs")
    check_metadata(build("seq1f1b", p=2, m=2, n=2, slice_weights=(0.6, 0.4)))
    bad_w = Schedule(name="x", num_ranks=2, virtual_stages=1, num_microbatches=2, num_slices=2,
                     ranks=build("seq1f1b", p=2, m=2, n=2).ranks, slice_weights=(0.7, 0.7))
    _fails(check_metadata, bad_w, "slice_weights=(0.7, 0.7)")


def test_swapped_recv_order_fails_comm_matching() -> None:
    low = lower(build("slimpipe", p=2, m=2, n=2))
    prog = list(low.ranks[1])
    # Post the receive for slice 1 before the one for slice 0 (each still before its own forward).
    i0, i1 = prog.index(act("1RECV_F0.0")), prog.index(act("1RECV_F0.1"))
    prog.insert(i0, prog.pop(i1))
    bad = with_program(low, 1, prog)
    for check in CHECKS[:6]:  # every compute-order check still passes
        check(bad)
    dry_run(bad)  # and nothing deadlocks: only the message order is wrong
    _fails(check_comm_matching, bad, "receive #0 on the forward channel 0→1", "0SEND_F0.0",
           "NCCL matches", "*1RECV_F0.1")


def test_comm_presence_and_placement() -> None:
    low = lower(build("1f1b", p=2, m=2))
    # A receive that is missing.
    _fails(check_comm_matching, with_program(low, 1, [a for a in low.ranks[1] if a != act("1RECV_F1")]),
           "1RECV_F1.0 is missing")
    # A send before the forward it sends.
    prog = list(low.ranks[0])
    i = prog.index(act("0SEND_F0"))
    prog[i - 1], prog[i] = prog[i], prog[i - 1]
    _fails(check_comm_matching, with_program(low, 0, prog), "0SEND_F0.0 must come after 0F0.0")
    # A send with no peer: the last stage has nowhere to send activations.
    _fails(check_comm_matching, with_program(low, 1, [*low.ranks[1], act("1SEND_F0")]), "has no peer")
    # A duplicated receive.
    prog = list(low.ranks[1])
    prog.insert(0, act("1RECV_F0"))
    _fails(check_comm_matching, with_program(low, 1, prog), "appears twice")


def test_deadlocking_lowered_schedule_is_caught_by_the_dry_run() -> None:
    # Rank 0 does no warm-up (F0 B0 F1 B1) while rank 1 forwards both micro-batches first: rank 0 waits
    # for B0's gradient, rank 1 waits for F1's activation. Every local check and comm order passes.
    compute = Schedule(
        name="custom", num_ranks=2, virtual_stages=1, num_microbatches=2, num_slices=1,
        ranks=(
            (act("0F0"), act("0B0"), act("0F1"), act("0B1")),
            (act("1F0"), act("1F1"), act("1B0"), act("1B1")),
        ),
    )
    low = lower(compute)
    for check in CHECKS[:7]:
        check(low)
    with pytest.raises(ScheduleError) as err:
        dry_run(low)
    assert err.value.check == "dry_run"
    msg = str(err.value)
    assert "0RECV_B0.0 waits for 1SEND_B0.0" in msg and "1RECV_F1.0 waits for 0SEND_F1.0" in msg
    assert {low.ranks[r][i] for r, i in err.value.marks} == {act("0RECV_B0"), act("1RECV_F1")}
    assert msg.count("<-- ERROR HERE") == 2
    e = _fails(check_pipeline_order, compute, "deadlock")
    assert len(e.marks) == 2


def test_same_rank_stage_order_p1() -> None:
    # p = 1, v = 2: no communication; stage 1's forward before stage 0's is a self-deadlock.
    good = build("slimpipe", p=1, m=1, n=1, v=2)
    assert [str(a) for a in good.ranks[0]] == ["0F0.0", "1F0.0", "1B0.0", "0B0.0"]
    bad = with_program(good, 0, [act("1F0"), act("0F0"), act("1B0"), act("0B0")])
    _fails(check_pipeline_order, bad, "1F0.0 waits for 0F0.0")
    bad_b = with_program(good, 0, [act("0F0"), act("1F0"), act("0B0"), act("1B0")])
    _fails(check_pipeline_order, bad_b, "0B0.0 waits for 1B0.0")


def test_long_schedule_error_grid_is_windowed() -> None:
    good = build("slimpipe", p=4, m=4, n=16)
    bad = _fifo_backward(good, rank=1, stage=1, mb=3)
    with pytest.raises(ScheduleError) as err:
        validate(bad)
    assert err.value.check == "check_slice_order"
    header = err.value.grid.splitlines()[0]
    assert "…" in header and len(header.split()) <= 2 * 12 + 4  # step + window on both sides + elisions
