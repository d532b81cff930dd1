"""Text forms of a Schedule: a rank × step grid for eyes, CSV and JSON for hand-editing and round-trips.

Every function returns a string (or a Schedule); nothing here prints.

* Grid: one row per rank, one column per program position ("step"), cells in the action string form
  (``2F3.1``), columns aligned. A marked cell gets a ``*`` and its row ends in ``<-- ERROR HERE``.
* CSV: one row per rank, comma-separated action strings (torch.distributed.pipelining's ``_dump_csv``
  layout), preceded by one ``# {json}`` metadata line so p, v, m, n, name and slice_weights round-trip.
  ``from_csv`` also reads torch-style CSV without that line: pass or infer the metadata.
* JSON: one object with the metadata and ``ranks`` as lists of action strings.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Sequence

from slimpipe.schedule.actions import Action, Schedule, ScheduleMeta, parse_action

__all__ = ["to_grid", "to_csv", "from_csv", "to_json", "from_json", "FORMAT_TAG"]

FORMAT_TAG = "slimpipe-schedule"
"""Value of the ``format`` key in the JSON form and in the CSV metadata line."""
_VERSION = 1


def _shown_columns(width: int, marks: Collection[tuple[int, int]], window: int | None) -> list[int | None]:
    """Column indices to print; None stands for an elided run (``…``)."""
    if window is None or not marks:
        return list(range(width))
    keep = sorted({c for _, s in marks for c in range(max(0, s - window), min(width, s + window + 1))})
    cols: list[int | None] = []
    for c in keep:
        if cols and cols[-1] is not None and c != cols[-1] + 1:
            cols.append(None)
        elif not cols and c > 0:
            cols.append(None)
        cols.append(c)
    if cols and cols[-1] is not None and cols[-1] < width - 1:
        cols.append(None)
    return cols


def to_grid(
    schedule: Schedule,
    *,
    mark: tuple[int, int] | None = None,
    marks: Collection[tuple[int, int]] = (),
    window: int | None = None,
) -> str:
    """Rank × step text grid of the per-rank programs.

    mark / marks: (rank, step) cells to flag with ``*`` and ``<-- ERROR HERE``. window: if given and
    something is marked, show only the steps within ``window`` of a marked step (elided runs print ``…``),
    so error messages stay readable on schedules with thousands of steps.
    """
    all_marks = set(marks) | ({mark} if mark is not None else set())
    width = max((len(prog) for prog in schedule.ranks), default=0)
    cols = _shown_columns(width, all_marks, window)
    rows: list[list[str]] = [["step"] + ["…" if c is None else str(c) for c in cols]]
    for r, prog in enumerate(schedule.ranks):
        row = [f"rank{r}"]
        for c in cols:
            if c is None:
                row.append("…")
            elif c < len(prog):
                row.append(("*" if (r, c) in all_marks else "") + str(prog[c]))
            else:
                row.append("")
        rows.append(row)
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for i, row in enumerate(rows):
        line = "  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip()
        flagged = sorted(s for r, s in all_marks if r == i - 1)
        if i > 0 and flagged:
            line += "  <-- ERROR HERE (step " + ", ".join(map(str, flagged)) + ")"
        lines.append(line)
    return "\n".join(lines) + "\n"


def _meta_dict(schedule: Schedule) -> dict[str, object]:
    return {
        "format": FORMAT_TAG,
        "version": _VERSION,
        "name": schedule.name,
        "p": schedule.num_ranks,
        "v": schedule.virtual_stages,
        "m": schedule.num_microbatches,
        "n": schedule.num_slices,
        "slice_weights": None if schedule.slice_weights is None else list(schedule.slice_weights),
        "meta": schedule.meta.to_dict(),
    }


def _from_parts(ranks: Sequence[Sequence[str]], meta: dict[str, object]) -> Schedule:
    """Build a Schedule from action strings and (possibly partial) metadata, inferring what is missing."""
    progs = tuple(tuple(parse_action(a) for a in row) for row in ranks)
    acts: list[Action] = [a for prog in progs for a in prog]
    p = int(meta.get("p") or len(progs))  # type: ignore[arg-type]
    if len(progs) < p:  # a torch CSV drops trailing ranks with empty programs
        progs = progs + ((),) * (p - len(progs))
    v = meta.get("v") or max(1, -(-(max((a.stage for a in acts), default=0) + 1) // p))
    m = meta.get("m") or max((a.microbatch for a in acts), default=0) + 1
    n = meta.get("n") or max((a.seq_slice for a in acts), default=0) + 1
    weights: list[float] | None = meta.get("slice_weights")  # type: ignore[assignment]
    extra = meta.get("meta") or {}
    return Schedule(
        name=str(meta.get("name") or "custom"),
        num_ranks=p,
        virtual_stages=int(v),  # type: ignore[arg-type]
        num_microbatches=int(m),  # type: ignore[arg-type]
        num_slices=int(n),  # type: ignore[arg-type]
        ranks=progs,
        slice_weights=None if weights is None else tuple(float(x) for x in weights),
        meta=ScheduleMeta.from_dict(dict(extra)),  # type: ignore[arg-type]
    )


def _check_format(meta: dict[str, object], source: str) -> None:
    if meta.get("format", FORMAT_TAG) != FORMAT_TAG or meta.get("version", _VERSION) != _VERSION:
        raise ValueError(
            f"{source}: format={meta.get('format')!r} version={meta.get('version')!r} is not "
            f"{FORMAT_TAG!r} version {_VERSION}: re-export it with slimpipe.schedule.format"
        )


def to_csv(schedule: Schedule) -> str:
    """One ``# {json metadata}`` line, then one row per rank of comma-separated actions."""
    head = "# " + json.dumps(_meta_dict(schedule), separators=(",", ":"))
    return "\n".join([head, *(",".join(map(str, prog)) for prog in schedule.ranks)]) + "\n"


def from_csv(text: str, **meta: object) -> Schedule:
    """Parse ``to_csv`` output, or a torch-style CSV (no metadata line: one row per rank).

    Keyword metadata (name, p, v, m, n, slice_weights) overrides the metadata line; whatever is still
    missing is inferred from the actions (p = rows, m/n/v from the largest indices seen).
    """
    lines = text.splitlines()
    header: dict[str, object] = {}
    if lines and lines[0].startswith("#"):
        header = json.loads(lines[0][1:])
        _check_format(header, "from_csv")
        lines = lines[1:]
    while lines and not lines[-1].strip():  # trailing newline(s), not empty ranks
        lines.pop()
    rows = [[cell.strip() for cell in line.split(",") if cell.strip()] for line in lines]
    return _from_parts(rows, {**header, **meta})


def to_json(schedule: Schedule) -> str:
    """The metadata plus ``ranks`` (lists of action strings), one rank per line."""
    head = _meta_dict(schedule)
    body = ",\n".join("  " + json.dumps([str(a) for a in prog]) for prog in schedule.ranks)
    fields = json.dumps(head, indent=1)[:-2]  # drop the closing "\n}" to append ranks
    return fields + ',\n "ranks": [\n' + body + "\n ]\n}\n"


def from_json(text: str) -> Schedule:
    """Parse ``to_json`` output (or any object with the same keys; p/v/m/n may be omitted)."""
    obj = json.loads(text)
    if not isinstance(obj, dict) or "ranks" not in obj:
        raise ValueError("from_json: expected an object with a 'ranks' list of per-rank action-string lists")
    _check_format(obj, "from_json")
    return _from_parts(obj["ranks"], obj)
