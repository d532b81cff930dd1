"""Single vs double warm-up (docs/design.md, "The warm-up choice"), measured with the dry run.

Zero latency, uniform costs (F = 1, B = 2): the two give the same makespan wherever both build, and
double holds (p − 1 − r) more units on rank r. With p2p latency overlapped with compute, double hides
it and single does not. ``python tests/schedule/test_schedule_warmup.py`` prints the table in the doc.
"""

from __future__ import annotations

import pytest

from slimpipe.config import ConfigError
from slimpipe.schedule import dry_run, peak_inflight
from slimpipe.schedule.builders import build

TABLE = [  # (builder, p, n, v, m) measured for docs/design.md
    ("1f1b", 4, 1, 1, 8), ("slimpipe", 4, 8, 1, 2), ("slimpipe", 4, 8, 1, 4), ("slimpipe", 8, 16, 1, 4),
    ("interleaved-1f1b", 8, 1, 2, 16), ("slimpipe", 4, 8, 2, 2), ("slimpipe", 8, 4, 2, 4),
    ("slimpipe", 8, 16, 2, 4), ("slimpipe", 16, 64, 5, 4),
]


def _pair(name: str, p: int, m: int, n: int, v: int):
    return tuple(build(name, p=p, m=m, n=n, v=v, warmup=w) for w in ("single", "double"))


@pytest.mark.parametrize("p", [2, 3, 4, 8])
def test_zero_latency_makespans_are_equal_and_double_costs_memory(p: int) -> None:
    compared = 0
    for name in ("1f1b", "seq1f1b", "interleaved-1f1b", "slimpipe"):
        for m in range(1, 2 * p + 2, 1 if p < 8 else 4):
            for n in (1, 2, 4, 8):
                for v in (1, 2):
                    try:
                        single, double = _pair(name, p, m, n, v)
                    except ConfigError:
                        continue
                    assert dry_run(single).makespan == dry_run(double).makespan, (name, p, m, n, v)
                    total = m * n * v
                    for r, (a, b) in enumerate(zip(peak_inflight(single), peak_inflight(double))):
                        assert b - a == min(p - 1 - r, total - a), (name, p, m, n, v, r)
                    compared += 1
    assert compared > 0


@pytest.mark.parametrize(("name", "p", "n", "v", "m"), TABLE[:-1])
def test_double_hides_overlapped_p2p_latency(name: str, p: int, n: int, v: int, m: int) -> None:
    single, double = _pair(name, p, m, n, v)
    for latency in (0.25, 1.0):
        s, d = dry_run(single, latency=latency).makespan, dry_run(double, latency=latency).makespan
        assert d < s
        if v == 1:
            # Double pays the latency only on the fill and the drain (p − 1 hops each way); single pays
            # it on the steady-state exchanges too. Interleaved, the wrap-around hops add some for both.
            assert d - dry_run(double).makespan == 2 * (p - 1) * latency


def measure() -> list[str]:
    rows = ["| schedule | p | n | v | m | rank-0 peak single / double (units) | makespan, latency 0 "
            "| latency 0.5: single / double | latency 1: single / double |",
            "|---|---|---|---|---|---|---|---|---|"]
    for name, p, n, v, m in TABLE:
        single, double = _pair(name, p, m, n, v)
        ms = {}
        for lat in (0.0, 0.5, 1.0):
            ms[lat] = tuple(f"{dry_run(x, latency=lat).makespan:g}" for x in (single, double))
        assert ms[0.0][0] == ms[0.0][1]
        rows.append(
            f"| {name} | {p} | {n} | {v} | {m} | {peak_inflight(single)[0]} / {peak_inflight(double)[0]} "
            f"| {ms[0.0][0]} | {' / '.join(ms[0.5])} | {' / '.join(ms[1.0])} |"
        )
    return rows


if __name__ == "__main__":
    print("\n".join(measure()))
