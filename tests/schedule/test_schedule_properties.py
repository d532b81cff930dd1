"""Property tests on random (builder, p, m, n, v, warm-up): refused exactly by the documented rule, else
valid, lowered, matched, deadlock-free, serialisable, with the rule's peak, and the invariants survive."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tests.support.schedule import must_refuse, warmup_w

from slimpipe.config import ConfigError
from slimpipe.schedule import ScheduleError, dry_run, from_csv, from_json, lower, to_csv, to_json, validate
from slimpipe.schedule.actions import Action, Kind
from slimpipe.schedule.builders import BUILDERS, build

configs = st.tuples(
    st.sampled_from(sorted(BUILDERS)),
    st.integers(1, 6),  # p
    st.integers(1, 10),  # m
    st.sampled_from([1, 2, 3, 4, 5, 6, 8]),  # n
    st.integers(1, 3),  # v
    st.sampled_from(["auto", "single", "double"]),
)


@settings(max_examples=150, deadline=None)
@given(configs)
def test_random_configuration(cfg: tuple[str, int, int, int, int, str]) -> None:
    name, p, m, n, v, warmup = cfg
    if must_refuse(name, p, m, n, v, warmup):
        with pytest.raises(ConfigError):
            build(name, p=p, m=m, n=n, v=v, warmup=warmup)
        return
    s = build(name, p=p, m=m, n=n, v=v, warmup=warmup)
    if name == "seq1f1b" and warmup == "auto":
        assert s.meta.w == 1  # Seq1F1B's own (single) warm-up
    elif name != "gpipe":
        assert s.meta.w == warmup_w(warmup, p, m, n, v)
    low = lower(s)
    validate(s)
    validate(low)
    assert from_csv(to_csv(low)) == low and from_json(to_json(s)) == s
    res = dry_run(low)
    # Uniform costs: no schedule beats the closed form (p−1)/(m·n·v+p−1) (each rank is busy 3·m·n·v).
    assert res.makespan >= 3 * (m * n * v + p - 1) - 1e-9
    assert all(b == 3 * m * n * v for b in res.busy())


@settings(max_examples=60, deadline=None)
@given(configs, st.data())
def test_swapping_two_slices_of_one_unit_is_rejected(cfg: tuple[str, int, int, int, int, str], data) -> None:
    name, p, m, n, v, warmup = cfg
    if n < 2 or must_refuse(name, p, m, n, v, warmup):
        return
    s = build(name, p=p, m=m, n=n, v=v, warmup=warmup)
    r = data.draw(st.integers(0, p - 1))
    kind = data.draw(st.sampled_from([Kind.F, Kind.B]))
    prog = list(s.ranks[r])
    a = data.draw(st.sampled_from([x for x in prog if x.kind is kind]))
    j2 = data.draw(st.sampled_from([j for j in range(n) if j != a.seq_slice]))
    i1 = prog.index(a)
    i2 = prog.index(Action(a.stage, kind, a.microbatch, j2))
    prog[i1], prog[i2] = prog[i2], prog[i1]
    ranks = list(s.ranks)
    ranks[r] = tuple(prog)
    with pytest.raises(ScheduleError) as err:
        validate(s.replace_ranks(tuple(ranks)))
    local = ("check_f_before_b", "check_slice_order", "check_microbatch_backward_after_forwards")
    assert err.value.check in local
