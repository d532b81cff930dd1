"""Timeline and memory plots of a simulated step (and optionally a measured one). matplotlib is imported
lazily (Agg backend), so importing this module costs nothing and needs no display.

Layout: one row per pipeline rank (rank 0 on top), F and B boxes coloured by slice (F light, B dark),
idle time left white so bubbles show; below it the per-rank memory curve over the same time axis, with
the GPU's memory as a dashed line and the area above it shaded red when a rank's peak exceeds it.

Big schedules (v5 n16 m8 is 1,280 compute actions per rank) turn into a texture at full width: ``View``
zooms into some ranks (``ranks``) and a window of each rank's compute steps (``steps``: the columns of
`slimpipe show`'s grid without send/recv), over the time span those steps take.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from slimpipe.schedule.actions import Action, Kind, parse_action
from slimpipe.trace import TraceEvent

if TYPE_CHECKING:
    from slimpipe.sim.evaluate import Evaluation

__all__ = ["plot_timeline", "simulated_trace_events", "memory_counters", "View", "rank_colours"]

_Event = tuple[int, Action, float, float]  # (rank, action, start, end)


@dataclass(frozen=True, kw_only=True, slots=True)
class View:
    """Which part of a step to draw."""

    ranks: tuple[int, ...] | None = None
    """Pipeline ranks to draw, top to bottom (None: all)."""
    steps: tuple[int, int] | None = None
    """Per-rank compute-step window [first, last) (None: the whole step); the time axis spans it."""


def simulated_trace_events(ev: Evaluation) -> list[TraceEvent]:
    """Every action of the simulated timeline as (rank, name, start_s, end_s, args) for write_chrome_trace."""
    tl = ev.timeline
    out: list[TraceEvent] = []
    for r, prog in enumerate(tl.schedule.ranks):
        for i, a in enumerate(prog):
            args = {"stage": a.stage, "microbatch": a.microbatch, "slice": a.seq_slice, "kind": a.kind.value}
            out.append((r, str(a), tl.start[r][i], tl.end[r][i], args))
    return out


def memory_counters(ev: Evaluation) -> list[tuple[int, str, float, float]]:
    """Per-rank memory curve samples (rank, "memory_gib", time_s, GiB) for Chrome "C" counter events."""
    from slimpipe.sim.metrics import memory_curve

    out = []
    for mb in ev.memory:
        times, values = memory_curve(ev.workload, ev.timeline, mb)
        out += [(mb.rank, "memory_gib", t, v) for t, v in zip(times, values)]
    return out


def rank_colours(p: int) -> list[tuple[float, float, float, float]]:
    """One distinct colour per rank: tab10 up to 10 ranks, tab20 up to 20, a sampled turbo map beyond
    (the default colour cycle repeats after 10)."""
    import matplotlib

    if p <= 10:
        return [matplotlib.colormaps["tab10"](r) for r in range(p)]
    if p <= 20:  # tab20's ten strong colours first, then their light partners
        return [matplotlib.colormaps["tab20"](2 * r if r < 10 else 2 * (r - 10) + 1) for r in range(p)]
    cmap = matplotlib.colormaps["turbo"]
    return [cmap(0.05 + 0.9 * r / (p - 1)) for r in range(p)]


def _boxes(events: Sequence[_Event], n: int, rows: dict[int, int]):
    """(PolyCollection vertices, face colours) of compute boxes; F light, B dark, hue by slice."""
    import matplotlib
    import numpy as np

    cmap = matplotlib.colormaps["viridis" if n > 10 else "tab10"]
    palette: dict[tuple[bool, int], object] = {}
    for j in range(n):
        base = np.array(cmap(j / max(1, n - 1) if n > 10 else j))
        light, dark = np.clip(base * 0.55 + 0.45, 0, 1), np.clip(base * 0.8, 0, 1)
        light[3] = dark[3] = 1.0
        palette[(True, j)], palette[(False, j)] = light, dark
    verts, colours = [], []
    top = len(rows) - 1
    for rank, a, start, end in events:
        y0 = top - rows[rank] + 0.1  # first shown rank on top
        verts.append(((start, y0), (end, y0), (end, y0 + 0.8), (start, y0 + 0.8)))
        colours.append(palette[(a.kind is Kind.F, a.seq_slice % n)])
    return verts, colours


def _window(events: Sequence[_Event], view: View) -> tuple[list[_Event], float, float]:
    """(the events of the shown ranks that overlap the window, window start, window end)."""
    shown = [e for e in events if view.ranks is None or e[0] in view.ranks]
    if view.steps is None:
        return shown, 0.0, max((e[3] for e in shown), default=1.0)
    first, last = view.steps
    index: dict[int, int] = {}
    inside = []
    for e in shown:  # events are in program order per rank
        k = index[e[0]] = index.get(e[0], -1) + 1
        if first <= k < last:
            inside.append(e)
    if not inside:
        return [], 0.0, 1.0
    lo, hi = min(e[2] for e in inside), max(e[3] for e in inside)
    return [e for e in shown if e[3] > lo and e[2] < hi], lo, hi


def _draw_timeline(ax, events: Sequence[_Event], ranks: Sequence[int], n: int, title: str, unit: str,
                   view: View) -> tuple[float, float]:
    """Draw the boxes of ``ranks`` inside the view's window; returns the window (start, end)."""
    from matplotlib.collections import PolyCollection

    rows = {r: i for i, r in enumerate(ranks)}
    drawn, lo, hi = _window(events, view)
    verts, colours = _boxes(drawn, n, rows)
    thin = len(verts) < 5000  # separating edges help small plots and cost too much on big ones
    ax.add_collection(PolyCollection(verts, facecolors=colours, edgecolors="white" if thin else "none",
                                     linewidths=0.4 if thin else 0.0))
    ax.set_xlim(lo, hi)
    ax.set_ylim(0, len(ranks))
    ax.set_yticks([len(ranks) - 1 - i + 0.5 for i in range(len(ranks))], [f"rank {r}" for r in ranks])
    ax.set_title(title, fontsize=9)
    ax.set_xlabel(unit)
    return lo, hi


def _measured_events(trace: Sequence[TraceEvent]) -> list[_Event]:
    out = []
    t0 = min((e[2] for e in trace), default=0.0)
    for rank, name, start, end, _ in trace:
        try:
            a = parse_action(name)
        except ValueError:
            continue  # profiler ranges that are not schedule actions
        if a.is_compute:
            out.append((rank, a, start - t0, end - t0))
    return out


def _draw_memory(ax, ev: Evaluation, ranks: Sequence[int], window: tuple[float, float], unit: str) -> list[str]:
    """Per-rank memory curves; the GPU's memory dashed, shaded red above it when a shown peak exceeds it.
    Returns the over-memory notes (also written on the chart)."""
    from slimpipe.sim.metrics import memory_curve

    rep, p = ev.report, ev.timeline.schedule.num_ranks
    colours = rank_colours(p)
    for r in ranks:
        times, values = memory_curve(ev.workload, ev.timeline, ev.memory[r])
        ax.step(times, values, where="post", label=f"rank {r}", linewidth=1, color=colours[r])
    notes = []
    top = max(ev.memory[r].peak for r in ranks) / 2**30
    if rep.hbm_bytes is not None:
        hbm = rep.hbm_bytes / 2**30
        ax.axhline(hbm, color="red", linestyle="--", linewidth=1, label=f"GPU memory {hbm:.1f} GiB")
        over = [r for r in ranks if ev.memory[r].peak / 2**30 > hbm]
        if over:
            worst = max(over, key=lambda r: ev.memory[r].peak)
            notes.append(f"peak {ev.memory[worst].peak / 2**30:.1f} GiB on rank {worst} exceeds the GPU's "
                         f"{hbm:.1f} GiB ({len(over)} rank{'s' if len(over) > 1 else ''} over)")
            ax.axhspan(hbm, top * 1.05, color="red", alpha=0.12, linewidth=0)
            ax.text(0.01, 0.97, "OVER GPU MEMORY: " + notes[0], transform=ax.transAxes, color="red",
                    fontsize=8, va="top", fontweight="bold")
        top = max(top, hbm)
    ax.set_ylim(0, top * 1.08)
    ax.set_xlim(*window)
    ax.set_ylabel("GiB per GPU")
    ax.set_xlabel(unit)
    ax.set_title("memory over time (model states + buffers + in-flight activations)", fontsize=9)
    if len(ranks) <= 16:
        ax.legend(fontsize=7, ncol=min(len(ranks) + 1, 9), loc="lower center")
    return notes


def plot_timeline(ev: Evaluation, path: str | Path, *, measured: Sequence[TraceEvent] | None = None,
                  title: str = "", view: View = View()) -> list[str]:
    """Draw the simulated timeline (+ the measured one if given) and per-rank memory curves to ``path``;
    returns warnings (a peak above the GPU's memory), which are also marked on the chart."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tl, sched = ev.timeline, ev.timeline.schedule
    p, n = sched.num_ranks, sched.num_slices
    ranks = list(view.ranks) if view.ranks is not None else list(range(p))
    analytic = ev.cost.name == "analytic"
    unit = "time (s)" if analytic else "time (units: F = 1, B = 2)"
    sim_events = [(r, a, s, e) for r in range(p) for a, s, e in tl.compute_events(r)]
    rows = 3 if measured is not None else 2
    height = max(2.0, 0.45 * len(ranks))
    fig, axes = plt.subplots(rows, 1, figsize=(14, 1.2 + height * (rows - 1) + 3),
                             gridspec_kw={"height_ratios": [height] * (rows - 1) + [3]})
    rep = ev.report
    step = f"{rep.step_time_s:.4g} s" if analytic else f"{rep.step_time_s:.4g} units"
    zoom = "" if view.steps is None else f"; compute steps {view.steps[0]}:{view.steps[1]} of each rank"
    head = (f"{title}  simulated: step {step}, bubble {100 * rep.bubble_ratio:.2f} %"
            f"  (F light / B dark, colour = slice 0…{n - 1}; white = idle{zoom})")
    window = _draw_timeline(axes[0], sim_events, ranks, n, head.strip(), unit, view)
    if measured is not None:
        mev = _measured_events(measured)
        span = max((e[3] for e in mev), default=0.0)
        label = f"measured: {len(mev)} compute actions over {span:.4g} s"
        _draw_timeline(axes[1], mev, ranks, n, label, "time (s)", view)
    notes = _draw_memory(axes[-1], ev, ranks, window, unit)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return notes
