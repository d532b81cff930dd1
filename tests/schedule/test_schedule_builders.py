"""Builders against the reference: the worked examples of §4.2/§4.3 transcribed from the text, the
n = 1 identities, and the peak in-flight formulas of §4.1/§6.2 (with Megatron's warm-up counts)."""

from __future__ import annotations

import re

import pytest
from tests.support.schedule import group_size

from slimpipe.config import ConfigError
from slimpipe.schedule import peak_inflight
from slimpipe.schedule.actions import Action, Kind
from slimpipe.schedule.builders import build


def _expand(text: str, rank: int, p: int) -> list[Action]:
    """Reference notation → actions. ``F0.3`` / ``B1.7..B1.0`` (v = 1: stage = rank) and ``F0/1/0-3`` /
    ``B0/0/3..0`` (micro-batch/virtual stage/slices: stage = k·p + rank); ranges run either way."""
    out = []
    for tok in text.split():
        m = re.fullmatch(r"([FB])(\d+)\.(\d+)(?:\.\.[FB]\d+\.(\d+))?", tok)
        if m:
            kind, mb, lo, hi = m.group(1), int(m.group(2)), int(m.group(3)), m.group(4)
            k = 0
        else:
            m = re.fullmatch(r"([FB])(\d+)/(\d+)/(\d+)(?:(?:-|\.\.)(\d+))?", tok)
            assert m, tok
            kind, mb, k, lo, hi = m.group(1), int(m.group(2)), int(m.group(3)), int(m.group(4)), m.group(5)
        hi = lo if hi is None else int(hi)
        step = 1 if hi >= lo else -1
        out += [Action(k * p + rank, Kind(kind), mb, j) for j in range(lo, hi + step, step)]
    return out


# Reference §4.2 (p = 4, n = 8, m = 2, the authors' double warm-up); the "..." of ranks 2 and 3 written out.
SEC_4_2 = [
    "F0.0..F0.7 F1.0..F1.5 B0.7 F1.6 B0.6 F1.7 B0.5 B0.4 B0.3 B0.2 B0.1 B0.0 B1.7..B1.0",
    "F0.0..F0.7 F1.0..F1.3 B0.7 F1.4 B0.6 F1.5 B0.5 F1.6 B0.4 F1.7 B0.3 B0.2 B0.1 B0.0 B1.7..B1.0",
    "F0.0..F0.7 F1.0 F1.1 B0.7 F1.2 B0.6 F1.3 B0.5 F1.4 B0.4 F1.5 B0.3 F1.6 B0.2 F1.7 B0.1 B0.0 B1.7..B1.0",
    "F0.0..F0.7 B0.7 F1.0 B0.6 F1.1 B0.5 F1.2 B0.4 F1.3 B0.3 F1.4 B0.2 F1.5 B0.1 F1.6 B0.0 F1.7 B1.7..B1.0",
]

# Reference §4.3 (p = 4, n = 8, g = 4, v = 2, m = 2): rank 0 in full, rank 3's printed prefix.
SEC_4_3_RANK0 = (
    "F0/0/0-3 F0/1/0-3 F0/0/4-7 F0/1/4-7 F1/0/0-3 F1/1/0 F1/1/1 B0/1/7 F1/1/2 B0/1/6 F1/1/3 B0/1/5 "
    "F1/0/4 B0/1/4 F1/0/5 B0/0/7 F1/0/6 B0/0/6 F1/0/7 B0/0/5 F1/1/4 B0/0/4 F1/1/5 B0/1/3 F1/1/6 B0/1/2 "
    "F1/1/7 B0/1/1 B0/1/0 B0/0/3..0 B1/1/7..4 B1/0/7..4 B1/1/3..0 B1/0/3..0"
)
SEC_4_3_RANK3_PREFIX = (
    "F0/0/0-3 F0/1/0-3 F0/0/4-7 F0/1/4-7 "  # F0/*/* (16 units)
    "B0/1/7 F1/0/0 B0/1/6 F1/0/1 B0/1/5 F1/0/2 B0/1/4 F1/0/3 B0/0/7 F1/1/0"
)


def test_reference_4_2_worked_example() -> None:
    s = build("slimpipe", p=4, m=2, n=8, warmup="double")
    for r in range(4):
        assert list(s.ranks[r]) == _expand(SEC_4_2[r], r, 4), r
    assert peak_inflight(s) == (14, 12, 10, 8)


def test_reference_4_3_worked_example() -> None:
    s = build("slimpipe", p=4, m=2, n=8, v=2)  # auto = double for v > 1
    assert list(s.ranks[0]) == _expand(SEC_4_3_RANK0, 0, 4)
    prefix = _expand(SEC_4_3_RANK3_PREFIX, 3, 4)
    assert list(s.ranks[3][: len(prefix)]) == prefix
    assert peak_inflight(s)[0] == 22 and peak_inflight(s)[3] == 16


@pytest.mark.parametrize("p", [1, 2, 3, 4, 8])
def test_slimpipe_n1_is_1f1b(p: int) -> None:
    for m in range(p, 2 * p + 2):
        for warmup in ("auto", "single"):  # Megatron's 1F1B
            assert build("slimpipe", p=p, m=m, n=1, warmup=warmup).ranks == build("1f1b", p=p, m=m).ranks
        if (m - 1) >= 2 * (p - 1):  # the double warm-up must fit
            double = build("slimpipe", p=p, m=m, warmup="double")
            assert double.ranks == build("1f1b", p=p, m=m, warmup="double").ranks


@pytest.mark.parametrize("p", [1, 2, 3, 4, 8])
def test_slimpipe_n1_interleaved_is_interleaved_1f1b(p: int) -> None:
    for v in (2, 3):
        for m in range(1, 2 * p + 2):
            try:
                ref = build("interleaved-1f1b", p=p, m=m, v=v)
            except ConfigError:
                with pytest.raises(ConfigError):
                    build("slimpipe", p=p, m=m, n=1, v=v)
                continue
            assert build("slimpipe", p=p, m=m, n=1, v=v).ranks == ref.ranks


@pytest.mark.parametrize("p", [2, 3, 4, 8])
def test_1f1b_peak_is_p_minus_r(p: int) -> None:
    for m in (p, 2 * p + 1):
        assert peak_inflight(build("1f1b", p=p, m=m)) == tuple(p - r for r in range(p))


@pytest.mark.parametrize("p", [1, 2, 3, 4, 8])
def test_slimpipe_peak_formula(p: int) -> None:
    # Reference §4.1: peak on rank r = n·v + w·(p−1−r) whenever g divides n (v = 1, or n has a divisor
    # ≥ p). Otherwise groups hold whole micro-batches and the first backward waits for (v−1)·|group 0| + n.
    checked = 0
    for n in (1, 2, 4, 8):
        for v in (1, 2):
            for warmup in ("single", "double"):
                for m in range(1, 2 * p + 2):
                    try:
                        s = build("slimpipe", p=p, m=m, n=n, v=v, warmup=warmup)
                    except ConfigError:
                        continue
                    w = s.meta.w
                    g = group_size(p, n, v)
                    first = n * v if n % g == 0 else (v - 1) * min(g, m * n) + n  # first group may be short
                    want = tuple(min(m * n * v, first + w * (p - 1 - r)) for r in range(p))
                    assert peak_inflight(s) == want, (p, m, n, v, warmup)
                    if n % g == 0:
                        assert want == tuple(n * v + w * (p - 1 - r) for r in range(p))
                    checked += 1
    assert checked > 0


@pytest.mark.parametrize(("p", "v"), [(2, 2), (4, 2), (4, 3), (8, 2)])
def test_interleaved_peak_matches_megatron_warmup(p: int, v: int) -> None:
    # Megatron: warm-up = min((p−r−1)·2 + (v−1)·p, m·v) forwards, then one more before the first backward.
    for m in (p, 2 * p):
        s = build("interleaved-1f1b", p=p, m=m, v=v)
        warm = [min((p - r - 1) * 2 + (v - 1) * p, m * v) for r in range(p)]
        assert peak_inflight(s) == tuple(min(x + 1, m * v) for x in warm)


@pytest.mark.parametrize("k", [1, 2, 4, 8])
def test_seq1f1b_warmup_is_p_minus_r_minus_1_plus_k_minus_1(k: int) -> None:
    p = 4
    s = build("seq1f1b", p=p, m=4, n=k)
    # Seq1F1B's warm-up p − r − 1 + (k − 1) forwards, then one more: peak = p − r + k − 1.
    assert peak_inflight(s) == tuple(p - r + k - 1 for r in range(p))


def test_seq1f1b_slice_weights_are_kept_and_checked() -> None:
    s = build("seq1f1b", p=2, m=2, n=3, slice_weights=(0.5, 0.3, 0.2))
    assert s.slice_fractions() == (0.5, 0.3, 0.2)
    with pytest.raises(ConfigError, match="slice_weights"):
        build("seq1f1b", p=2, m=2, n=3, slice_weights=(0.5, 0.5))


def test_gpipe_is_all_forwards_then_all_backwards() -> None:
    s = build("gpipe", p=2, m=2, n=2)
    for prog in s.ranks:
        kinds = [a.kind for a in prog]
        assert kinds == [Kind.F] * 4 + [Kind.B] * 4


def test_unknown_names_and_counts() -> None:
    with pytest.raises(ConfigError, match="unknown"):
        build("zb-v", p=2, m=2)
    with pytest.raises(ConfigError, match="--warmup"):
        build("slimpipe", p=2, m=2, warmup="triple")
    with pytest.raises(ConfigError, match="--pp"):
        build("slimpipe", p=0, m=2)
