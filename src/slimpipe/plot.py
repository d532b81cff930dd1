"""Timeline and memory plots of a simulated step (and optionally a measured one). matplotlib is imported
lazily (Agg backend), so importing this module costs nothing and needs no display.

Layout: one row per pipeline rank (rank 0 on top), F and B boxes coloured by slice (F light, B dark),
idle time left white so bubbles show; below it the per-rank memory curve over the same time axis.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from slimpipe.schedule.actions import Action, Kind, parse_action
from slimpipe.trace import TraceEvent

if TYPE_CHECKING:
    from slimpipe.sim.evaluate import Evaluation

__all__ = ["plot_timeline", "simulated_trace_events", "memory_counters"]


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


def _boxes(events: Sequence[tuple[int, Action, float, float]], n: int, p: int):
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
    for rank, a, start, end in events:
        y0 = p - 1 - rank + 0.1  # rank 0 on top
        verts.append(((start, y0), (end, y0), (end, y0 + 0.8), (start, y0 + 0.8)))
        colours.append(palette[(a.kind is Kind.F, a.seq_slice % n)])
    return verts, colours


def _draw_timeline(ax, events: Sequence[tuple[int, Action, float, float]], p: int, n: int, title: str,
                   unit: str) -> None:
    from matplotlib.collections import PolyCollection

    verts, colours = _boxes(events, n, p)
    thin = len(verts) < 5000  # separating edges help small plots and cost too much on big ones
    ax.add_collection(PolyCollection(verts, facecolors=colours, edgecolors="white" if thin else "none",
                                     linewidths=0.4 if thin else 0.0))
    end = max((e[3] for e in events), default=1.0)
    ax.set_xlim(0, end)
    ax.set_ylim(0, p)
    ax.set_yticks([p - 1 - r + 0.5 for r in range(p)], [f"rank {r}" for r in range(p)])
    ax.set_title(title, fontsize=9)
    ax.set_xlabel(unit)


def _measured_events(trace: Sequence[TraceEvent]) -> list[tuple[int, Action, float, float]]:
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


def plot_timeline(ev: Evaluation, path: str | Path, *, measured: Sequence[TraceEvent] | None = None,
                  title: str = "") -> None:
    """Draw the simulated timeline (+ the measured one if given) and per-rank memory curves to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from slimpipe.sim.metrics import memory_curve

    tl, sched = ev.timeline, ev.timeline.schedule
    p, n = sched.num_ranks, sched.num_slices
    unit = "time (s)" if ev.cost.name == "analytic" else "time (units: F = 1, B = 2)"
    sim_events = [(r, a, s, e) for r in range(p) for a, s, e in tl.compute_events(r)]
    rows = 3 if measured is not None else 2
    fig, axes = plt.subplots(rows, 1, figsize=(14, 1.2 + 0.45 * p * (rows - 1) + 3),
                             gridspec_kw={"height_ratios": [max(2, 0.45 * p)] * (rows - 1) + [3]})
    rep = ev.report
    head = (f"{title}  simulated: step {rep.step_time_s:.4g}, bubble {100 * rep.bubble_ratio:.2f} %"
            f"  (F light / B dark, colour = slice 0…{n - 1}; white = idle)")
    _draw_timeline(axes[0], sim_events, p, n, head.strip(), unit)
    if measured is not None:
        mev = _measured_events(measured)
        span = max((e[3] for e in mev), default=0.0)
        label = f"measured: {len(mev)} compute actions over {span:.4g} s"
        _draw_timeline(axes[1], mev, p, n, label, "time (s)")
    mem_ax = axes[-1]
    for mb in ev.memory:
        times, values = memory_curve(ev.workload, tl, mb)
        mem_ax.step(times, values, where="post", label=f"rank {mb.rank}", linewidth=1)
    if rep.hbm_bytes is not None:
        mem_ax.axhline(rep.hbm_bytes / 2**30, color="red", linestyle="--", linewidth=1, label="HBM")
    mem_ax.set_xlim(0, tl.makespan)
    mem_ax.set_ylabel("GiB per GPU")
    mem_ax.set_xlabel(unit)
    mem_ax.set_title("memory over time (model states + buffers + in-flight activations)", fontsize=9)
    if p <= 16:
        mem_ax.legend(fontsize=7, ncol=min(p + 1, 9), loc="lower center")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
