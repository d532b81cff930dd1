"""`simulate` runs the event engine with a cost model's timing; under the uniform cost it must time every
compute action as the dry run's reference run does (its own implementation of schedule/semantics.py, keyed
by (kind, stage, mb, slice)): plain, with vocabulary collectives and with the attention exchange. The dry
run's engine path is held equal to the reference in tests/vocab/test_vocab_dry_run.py."""

from __future__ import annotations

import itertools

import pytest

from slimpipe.config import ConfigError
from slimpipe.schedule import lower
from slimpipe.schedule.dryrun import _dry_run_generic
from slimpipe.schedule.actions import COMPUTE_KINDS
from slimpipe.schedule.builders import build
from slimpipe.schedule.exchange import add_exchange
from slimpipe.schedule.vocab import add_vocab_parallel
from slimpipe.sim import UniformCost, simulate

VARIANTS = {"plain": lambda s: s, "vocab": add_vocab_parallel, "exchange": lambda s: add_exchange(s, 2)}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_simulator_agrees_with_the_reference_dry_run_under_uniform_costs(variant: str) -> None:
    checked = 0
    for name, p, m, n, v in itertools.product(["1f1b", "interleaved-1f1b", "seq1f1b", "slimpipe"], [2, 4],
                                              [2, 5], [1, 4], [1, 2]):
        try:
            sched = VARIANTS[variant](lower(build(name, p=p, m=m, n=n, v=v)))
        except ConfigError:
            continue
        want = _dry_run_generic(sched, duration=None, latency=0.0, check="test")
        got = simulate(sched, UniformCost())
        assert got.makespan == want.makespan, (name, p, m, n, v)
        for r, prog in enumerate(sched.ranks):
            for i, a in enumerate(prog):
                if a.kind in COMPUTE_KINDS:
                    assert (got.start[r][i], got.end[r][i]) == (want.start[r][i], want.end[r][i]), (r, i, a)
        checked += 1
    assert checked >= 12
