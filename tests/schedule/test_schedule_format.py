"""Text grid, CSV and JSON: round trips for every builder, torch-style CSV, golden grids.

Golden grids live in tests/schedule/golden/<case>.txt. After an intended schedule change, regenerate
them with ``SLIMPIPE_REGEN_GOLDEN=1 pytest tests/schedule/test_schedule_format.py`` and review the diff.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from slimpipe.config import ConfigError
from slimpipe.schedule import from_csv, from_json, lower, to_csv, to_grid, to_json
from slimpipe.schedule.actions import Schedule
from slimpipe.schedule.builders import BUILDERS, build

GOLDEN = Path(__file__).parent / "golden"
REGEN = os.environ.get("SLIMPIPE_REGEN_GOLDEN") == "1"

GOLDEN_CASES = {
    # reference §4.2 worked example (non-interleaved, the authors' double warm-up)
    "slimpipe_p4_n8_v1_m2_double": dict(name="slimpipe", p=4, m=2, n=8, v=1, warmup="double"),
    # reference §4.3 worked example (interleaved, g = 4; auto = double)
    "slimpipe_p4_n8_v2_m2": dict(name="slimpipe", p=4, m=2, n=8, v=2),
    "1f1b_p4_m4": dict(name="1f1b", p=4, m=4),
    "interleaved-1f1b_p2_m4_v2": dict(name="interleaved-1f1b", p=2, m=4, v=2),
    "seq1f1b_p2_n4_m2": dict(name="seq1f1b", p=2, m=2, n=4),
}
LOWERED_CASES = {"1f1b_p2_m3_lowered": dict(name="1f1b", p=2, m=3)}


def _golden(case: str, text: str) -> None:
    path = GOLDEN / f"{case}.txt"
    if REGEN:
        path.write_text(text)
    assert path.exists(), f"missing {path}: run with SLIMPIPE_REGEN_GOLDEN=1 to create it"
    assert text == path.read_text(), f"{case} differs from {path} (SLIMPIPE_REGEN_GOLDEN=1 regenerates)"


@pytest.mark.parametrize("case", list(GOLDEN_CASES))
def test_golden_grid(case: str) -> None:
    kw = dict(GOLDEN_CASES[case])
    _golden(case, to_grid(build(kw.pop("name"), **kw)))


@pytest.mark.parametrize("case", list(LOWERED_CASES))
def test_golden_lowered_grid(case: str) -> None:
    kw = dict(LOWERED_CASES[case])
    _golden(case, to_grid(lower(build(kw.pop("name"), **kw))))


def _all_builds() -> list[Schedule]:
    out = []
    for name in BUILDERS:
        for p, m, n, v in [(1, 1, 1, 1), (2, 3, 2, 1), (3, 4, 1, 2), (4, 2, 8, 2), (2, 2, 4, 3)]:
            try:
                out.append(build(name, p=p, m=m, n=n, v=v))
            except ConfigError:
                pass
    out.append(build("seq1f1b", p=2, m=2, n=3, slice_weights=(0.5, 0.3, 0.2)))
    return out


def _case_id(s: Schedule) -> str:
    return f"{s.name}-p{s.num_ranks}-m{s.num_microbatches}-n{s.num_slices}-v{s.virtual_stages}"


@pytest.mark.parametrize("sched", _all_builds(), ids=_case_id)
def test_round_trips(sched: Schedule) -> None:
    for s in (sched, lower(sched)):
        for back in (from_csv(to_csv(s)), from_json(to_json(s))):
            assert back == s
            assert back.meta == s.meta
            assert back.slice_weights == s.slice_weights
    json.loads(to_json(sched))  # plain JSON


def test_json_layout_is_one_rank_per_line() -> None:
    text = to_json(build("1f1b", p=2, m=2))
    assert '  ["0F0.0", "0F1.0", "0B0.0", "0B1.0"],' in text.splitlines()
    assert json.loads(text)["p"] == 2


def test_torch_style_csv_without_metadata() -> None:
    # torch.distributed.pipelining's _dump_csv: one row per rank, actions without the slice suffix.
    text = "0F0,0F1,0B0,0B1\n1F0,1B0,1F1,1B1\n"
    s = from_csv(text)
    assert (s.name, s.num_ranks, s.virtual_stages, s.num_microbatches, s.num_slices) == ("custom", 2, 1, 2, 1)
    assert s.ranks == build("1f1b", p=2, m=2).ranks
    s2 = from_csv(text, name="mine", m=2)
    assert s2.name == "mine"


def test_csv_metadata_line_and_overrides() -> None:
    text = to_csv(build("slimpipe", p=2, m=2, n=2, v=2))
    head = text.splitlines()[0]
    assert head.startswith("# ") and json.loads(head[2:])["format"] == "slimpipe-schedule"
    assert from_csv(text, name="edited").name == "edited"


def test_parse_errors_name_the_bad_input() -> None:
    with pytest.raises(ValueError, match="cannot parse action '0X1'"):
        from_csv("0F0,0X1\n")
    with pytest.raises(ValueError, match="not 'slimpipe-schedule' version 1"):
        from_json(json.dumps({"format": "other", "ranks": []}))
    with pytest.raises(ValueError, match="'ranks'"):
        from_json("[]")


def test_grid_columns_are_aligned() -> None:
    grid = to_grid(lower(build("slimpipe", p=3, m=3, n=2)))
    lines = grid.splitlines()
    assert len(lines) == 1 + 3 and lines[0].startswith("step") and lines[3].startswith("rank2")
    # Each column starts at the same offset in every row: step numbers sit above their cells.
    header = lines[0]
    starts = [i for i in range(len(header)) if header[i] != " " and (i == 0 or header[i - 1] == " ")]
    for line in lines[1:]:
        for c in starts[1:]:
            if len(line) > c:  # shorter programs leave trailing cells empty (and stripped)
                assert line[c - 2 : c] == "  " and line[c] != " ", (c, line)


def test_grid_marks_and_window() -> None:
    s = build("1f1b", p=2, m=30)
    grid = to_grid(s, mark=(1, 40), window=2)
    lines = grid.splitlines()
    assert lines[0].split() == ["step", "…", "38", "39", "40", "41", "42", "…"]
    assert lines[2].endswith("<-- ERROR HERE (step 40)")
    assert "*" + str(s.ranks[1][40]) in lines[2]
    assert "*" not in lines[1] and "ERROR" not in lines[1]
    assert to_grid(s, marks=[(0, 0)], window=1).splitlines()[0].split() == ["step", "0", "1", "…"]
