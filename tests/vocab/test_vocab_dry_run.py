"""The fast dry run behind the vocabulary placement gives exactly what the reference dry run gives: the same
times, the same deadlocks and error messages, the same placed collectives; and it stays several times
faster. No torch."""

from __future__ import annotations

import random
import time

import pytest

from slimpipe.config import ConfigError
from slimpipe.schedule import ScheduleError, dry_run, validate
from slimpipe.schedule.actions import NO_STAGE, Action, Kind, parse_action
from slimpipe.schedule.builders import BUILDERS, build
from slimpipe.schedule.exchange import add_exchange
from slimpipe.schedule.dryrun import _dry_run, _dry_run_generic
from slimpipe.schedule.passes import lower, uniform_duration
from slimpipe.schedule.vocab import _due_times, add_vocab_parallel


def _durations(a: Action) -> float:
    """Unequal durations that depend on (kind, stage, slice) only, as a cost model's do."""
    return (0.5, 1.0, 1.25, 3.0, 0.1)[(7 * a.stage + 3 * a.seq_slice + len(a.kind.value)) % 5]


def _schedules():
    for name in BUILDERS:
        for p, n, v, m in ((1, 2, 2, 2), (2, 4, 1, 3), (3, 2, 2, 2), (4, 4, 2, 3), (4, 1, 1, 5)):
            try:
                base = lower(build(name, p=p, m=m, n=n, v=v))
            except ConfigError:
                continue
            yield base
            yield add_vocab_parallel(base)
            yield add_vocab_parallel(base, duration=_durations)
            if p > 1 and n > 1:
                yield add_exchange(add_vocab_parallel(base), 100)


def _outcome(run, schedule, duration, latency, check="test"):
    """(start, end, makespan) of a dry run, or its error message."""
    try:
        result = run(schedule, duration=duration, latency=latency, check=check)
    except ScheduleError as exc:
        return str(exc)
    return result.start, result.end, result.makespan


def _corrupted(schedule, rng: random.Random):
    """The schedule with two actions of one rank swapped, or one dropped (most of these deadlock)."""
    r = rng.randrange(schedule.num_ranks)
    prog = list(schedule.ranks[r])
    a, b = rng.sample(range(len(prog)), 2)
    if rng.random() < 0.5:
        prog[a], prog[b] = prog[b], prog[a]
    else:
        del prog[a]
    ranks = list(schedule.ranks)
    ranks[r] = tuple(prog)
    return schedule.replace_ranks(tuple(ranks))


def test_same_times_deadlocks_and_errors_as_the_reference() -> None:
    rng, count, deadlocks = random.Random(7), 0, 0
    for sched in _schedules():
        variants = [sched] + [_corrupted(sched, rng) for _ in range(3)]
        for s in variants:
            for duration, latency in ((None, 0.0), (None, 1.0), (_durations, 0.37)):
                want = _outcome(_dry_run_generic, s, duration, latency)
                assert _outcome(_dry_run, s, duration, latency) == want, (s.name, duration, latency)
                count += 1
                deadlocks += isinstance(want, str)
    assert count > 300 and 50 < deadlocks < count - 100  # both paths exercised


def test_table_durations_equal_asking_every_action() -> None:
    s = add_vocab_parallel(lower(build("slimpipe", p=4, m=3, n=4, v=2)), duration=_durations)
    table = {(a.kind, a.stage, a.seq_slice): _durations(a) for prog in s.ranks for a in prog}
    got = _dry_run(s, duration=_durations, latency=0.5, check="test", table=table)
    want = _dry_run_generic(s, duration=_durations, latency=0.5, check="test")
    assert (got.start, got.end, got.makespan) == (want.start, want.end, want.makespan)
    table.pop((Kind.F, 3, 2))  # a hole: the reference path fills it by asking
    got = _dry_run(s, duration=_durations, latency=0.5, check="test", table=table)
    assert (got.start, got.end) == (want.start, want.end)


def test_off_grid_actions_take_the_reference_path() -> None:
    s = lower(build("slimpipe", p=2, m=2, n=2))
    ranks = list(s.ranks)
    ranks[1] = ranks[1] + (Action(1, Kind.F, 5, 0),)  # micro-batch 5 of m = 2: nothing feeds it
    off = s.replace_ranks(tuple(ranks))
    with pytest.raises(ScheduleError, match="deadlock") as exc:
        dry_run(off)
    assert str(exc.value) == _outcome(_dry_run_generic, off, None, 0.0, "dry_run")
    with pytest.raises(ScheduleError, match="check_counts"):
        validate(off)


def _reference_placement(schedule, duration=None):
    """add_vocab_parallel as first written: per-action durations, the reference dry run, a linear walk."""
    lowered = lower(schedule)
    dur = duration or uniform_duration
    fwd = [dur(a) for prog in lowered.ranks for a in prog if a.kind is Kind.F]
    tl = _dry_run_generic(lowered, duration=dur, latency=sum(fwd) / max(1, len(fwd)), check="reference")
    ranks = []
    for r, prog in enumerate(lowered.ranks):
        out, i = [], 0
        for t, _, mb, j, kind in _due_times(lowered, tl.start, tl.end, True):
            while i < len(prog) and tl.end[r][i] <= t:
                out.append(prog[i])
                i += 1
            out.append(Action(NO_STAGE, kind, mb, j))
        ranks.append(tuple(out + list(prog[i:])))
    return tuple(ranks)


def test_placement_equals_the_reference_placement() -> None:
    for name in BUILDERS:
        for p, n, v, m in ((2, 4, 2, 3), (4, 8, 1, 4), (4, 4, 2, 2), (3, 1, 1, 4)):
            try:
                sched = build(name, p=p, m=m, n=n, v=v)
            except ConfigError:
                continue
            for duration in (None, _durations):
                assert add_vocab_parallel(sched, duration=duration).ranks == \
                    _reference_placement(sched, duration), (name, p, n, v, m, duration)


def test_a_collective_that_cannot_complete_is_still_a_deadlock() -> None:
    """VH0.0 after the last rank's B(last, 0, 0), which needs its result: the fast path must report what
    the reference reports, stuck actions and all."""
    vp = add_vocab_parallel(build("slimpipe", p=4, m=3, n=4))
    last = vp.num_ranks - 1
    prog = [a for a in vp.ranks[last] if a != parse_action("VH0.0")]
    prog.insert(prog.index(parse_action(f"{vp.num_stages - 1}B0.0")) + 1, parse_action("VH0.0"))
    ranks = list(vp.ranks)
    ranks[last] = tuple(prog)
    bad = vp.replace_ranks(tuple(ranks))
    with pytest.raises(ScheduleError, match="deadlock") as exc:
        dry_run(bad)
    assert "VH0.0" in str(exc.value)
    assert str(exc.value) == _outcome(_dry_run_generic, bad, None, 0.0, "dry_run")


def _best(fn, repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def test_fast_dry_run_is_several_times_faster() -> None:
    """Best-of-3 back to back, so machine load scales both (measured ≈ 4–6×; 2× is the floor)."""
    s = add_vocab_parallel(build("slimpipe", p=8, m=4, n=16, v=2))
    fast = _best(lambda: _dry_run(s, duration=None, latency=1.0, check="t"))
    reference = _best(lambda: _dry_run_generic(s, duration=None, latency=1.0, check="t"))
    assert fast * 2 < reference, (fast, reference)
