"""Chrome/Perfetto trace files (JSON), written by the simulator and the trainer alike. Imports no torch.

Format: ``{"traceEvents": [...], "displayTimeUnit": "ms"}``; ``"ph": "X"`` complete events with ``name``
(the action string, e.g. ``2F3.1``), ``pid`` = pipeline rank, ``tid`` = 0, ``ts``/``dur`` in microseconds
and ``args``; ``"ph": "M"`` metadata naming each process ``rank r``; ``"ph": "C"`` counter events for
memory curves. Opens in ui.perfetto.dev or chrome://tracing.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path

__all__ = ["TraceEvent", "Counter", "write_chrome_trace", "read_chrome_trace", "chrome_trace_dict"]

TraceEvent = tuple[int, str, float, float, Mapping[str, object] | None]
"""(rank, name, start_s, end_s, args): one executed action."""
Counter = tuple[int, str, float, float]
"""(rank, counter name, time_s, value): one sample of a counter track (e.g. memory in GiB)."""


def chrome_trace_dict(events: Iterable[TraceEvent], counters: Iterable[Counter] = ()) -> dict[str, object]:
    """The trace as a JSON-ready dict (see the module docstring)."""
    out: list[dict[str, object]] = []
    ranks: set[int] = set()
    for rank, name, start, end, args in events:
        ranks.add(rank)
        out.append({"name": name, "cat": _category(name), "ph": "X", "pid": rank, "tid": 0,
                    "ts": start * 1e6, "dur": max(0.0, end - start) * 1e6, "args": dict(args or {})})
    for rank, name, t, value in counters:
        ranks.add(rank)
        out.append({"name": name, "ph": "C", "pid": rank, "ts": t * 1e6, "args": {name: value}})
    for rank in sorted(ranks):
        out.append({"name": "process_name", "ph": "M", "pid": rank, "args": {"name": f"rank {rank}"}})
        out.append({"name": "process_sort_index", "ph": "M", "pid": rank, "args": {"sort_index": rank}})
    return {"traceEvents": out, "displayTimeUnit": "ms"}


def write_chrome_trace(events: Iterable[TraceEvent], path: str | Path,
                       counters: Iterable[Counter] = ()) -> None:
    """Write ``events`` (and optional counter samples) as a Chrome trace JSON file."""
    Path(path).write_text(json.dumps(chrome_trace_dict(events, counters)))


def read_chrome_trace(path: str | Path) -> list[TraceEvent]:
    """The complete ("X") events of a Chrome trace as (rank, name, start_s, end_s, args), sorted by start.

    Accepts the object form (``{"traceEvents": [...]}``) and the bare-list form. Raises ValueError with
    the file name if the file is not a trace.
    """
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not a readable Chrome trace JSON ({exc})") from None
    events = data.get("traceEvents") if isinstance(data, dict) else data
    if not isinstance(events, list):
        raise ValueError(f"{path}: no traceEvents list; expected a Chrome trace")
    out: list[TraceEvent] = []
    for ev in events:
        if not isinstance(ev, dict) or ev.get("ph") != "X":
            continue
        start = float(ev["ts"]) / 1e6
        out.append((int(ev.get("pid", 0)), str(ev["name"]), start, start + float(ev.get("dur", 0)) / 1e6,
                    ev.get("args") or {}))
    out.sort(key=lambda e: (e[2], e[0]))
    return out


def _category(name: str) -> str:
    """``compute`` for F/B/W actions, ``comm`` for SEND/RECV, ``other`` otherwise."""
    core = name.lstrip("0123456789")
    if core.startswith(("SEND", "RECV")):
        return "comm"
    return "compute" if core[:1] in ("F", "B", "W") else "other"
