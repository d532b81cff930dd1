"""The VE/VH/VB collectives in the schedule IR: placement, validation, dry run, text forms. No torch."""

from __future__ import annotations

import pytest

from slimpipe.config import ConfigError
from slimpipe.schedule import ScheduleError, dry_run, from_csv, from_json, lower, to_csv, to_json, validate
from slimpipe.schedule.actions import NO_STAGE, VOCAB_KINDS, Action, Kind, parse_action
from slimpipe.schedule.builders import BUILDERS, build
from slimpipe.schedule.vocab import add_vocab_parallel, has_vocab, vocab_order


def _grid():
    for name in BUILDERS:
        for p in (1, 2, 4):
            for n in (1, 4):
                for v in (1, 2):
                    for m in (2, 4):
                        try:
                            yield name, build(name, p=p, m=m, n=n, v=v)
                        except ConfigError:
                            continue


def test_every_builder_validates_with_collectives_in_one_order() -> None:
    count = 0
    for name, sched in _grid():
        vp = add_vocab_parallel(sched)
        validate(vp)  # includes check_vocab_collectives and the deadlock dry run
        orders = [[a for _, a in vocab_order(vp, r)] for r in range(vp.num_ranks)]
        m, n = sched.num_microbatches, sched.num_slices
        assert all(o == orders[0] for o in orders), name
        assert len(orders[0]) == 3 * m * n and len(set(orders[0])) == 3 * m * n
        assert vp.compute_only() == lower(sched).compute_only()  # the compute is untouched
        assert add_vocab_parallel(vp) is vp  # idempotent
        count += 1
    assert count > 40


def test_exchange_markers_are_paired_again_around_the_collectives() -> None:
    from slimpipe.schedule.exchange import add_exchange, has_exchange

    sched = build("slimpipe", p=4, m=3, n=8)
    both = add_vocab_parallel(add_exchange(sched, 100))  # either order gives the same schedule
    assert has_exchange(both) and both == add_exchange(add_vocab_parallel(sched), 100)
    validate(both)


def test_owner_sides() -> None:
    vp = add_vocab_parallel(build("slimpipe", p=4, m=3, n=4, v=2))
    last = vp.num_stages - 1
    r0 = [str(a) for a in vp.ranks[0]]
    rl = [str(a) for a in vp.ranks[3]]
    for mb in range(3):
        for j in range(4):
            assert r0.index(f"VE{mb}.{j}") < r0.index(f"0F{mb}.{j}")
            assert r0.index(f"VB{mb}.{j}") > r0.index(f"0B{mb}.{j}")
            assert rl.index(f"{last}F{mb}.{j}") < rl.index(f"VH{mb}.{j}") < rl.index(f"{last}B{mb}.{j}")


def test_string_form_round_trips() -> None:
    a = parse_action("VH3.2")
    assert a == Action(NO_STAGE, Kind.VH, 3, 2) and str(a) == "VH3.2"
    assert str(parse_action("VE1")) == "VE1.0"
    for bad in ("2VH0.1", "F0.1", "-1VB0.0"):
        with pytest.raises(ValueError, match="cannot parse"):
            parse_action(bad)
    vp = add_vocab_parallel(build("slimpipe", p=2, m=2, n=4))
    assert from_csv(to_csv(vp)) == vp and from_json(to_json(vp)) == vp
    assert has_vocab(from_csv(to_csv(vp)))


def _edit(sched, rank, program):
    ranks = list(sched.ranks)
    ranks[rank] = tuple(program)
    return sched.replace_ranks(tuple(ranks))


def test_validator_rejects_broken_collectives() -> None:
    vp = add_vocab_parallel(build("slimpipe", p=4, m=3, n=4))
    prog = list(vp.ranks[2])
    coll = [i for i, a in enumerate(prog) if a.kind in VOCAB_KINDS]
    swapped = prog.copy()
    swapped[coll[3]], swapped[coll[4]] = prog[coll[4]], prog[coll[3]]
    with pytest.raises(ScheduleError, match="collective order differs"):
        validate(_edit(vp, 2, swapped))
    with pytest.raises(ScheduleError, match="lacks"):
        validate(_edit(vp, 2, prog[: coll[5]] + prog[coll[5] + 1 :]))
    with pytest.raises(ScheduleError, match="twice"):
        validate(_edit(vp, 2, prog + [prog[coll[0]]]))
    r0 = list(vp.ranks[0])  # VE0.3 moved right behind the forward that consumes it (same collective order)
    r0.remove(parse_action("VE0.3"))
    r0.insert(r0.index(parse_action("0F0.3")) + 1, parse_action("VE0.3"))
    with pytest.raises(ScheduleError, match="must run before"):
        validate(_edit(vp, 0, r0))


def test_dry_run_catches_a_collective_placed_too_late() -> None:
    """VH0.0 at the end of every program: the last rank's B(last, 0, 0) waits for it and never gets there."""
    vp = add_vocab_parallel(build("slimpipe", p=4, m=3, n=4))
    # every rank's order must agree, so VH0.0 moves to the end everywhere
    ranks = [tuple([a for a in p if a != parse_action("VH0.0")] + [parse_action("VH0.0")]) for p in vp.ranks]
    late = vp.replace_ranks(tuple(ranks))
    with pytest.raises(ScheduleError, match="deadlock"):
        dry_run(late)


def test_lock_step_costs_little_with_the_double_warmup() -> None:
    """Uniform costs (F = 1, B = 2), collectives free: the makespan grows only by the lock-step fill
    (placement along a timeline where messages arrive one forward later; latency-0 placement cost +45 %)."""
    for p, m, n, v, limit in ((4, 4, 8, 1, 1.03), (8, 4, 16, 1, 1.04), (4, 2, 8, 2, 1.02)):
        sched = build("slimpipe", p=p, m=m, n=n, v=v)
        base, vp = dry_run(sched).makespan, dry_run(add_vocab_parallel(sched)).makespan
        assert base <= vp <= limit * base, (p, m, n, v, base, vp)
