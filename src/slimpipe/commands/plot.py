"""`slimpipe plot`: draw the simulated timeline and memory curves; optionally write a Chrome/Perfetto trace
and overlay a measured trace from `slimpipe train`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

__all__ = ["HELP", "add_arguments", "run", "IMAGE_TYPES"]

IMAGE_TYPES = ("png", "pdf", "svg", "svgz", "jpg", "jpeg", "tif", "tiff", "webp", "eps", "ps", "pgf", "raw",
               "rgba")
"""Extensions every matplotlib ≥ 3.8 writes (``savefig`` picks the format from the extension)."""

HELP = "plot the simulated timeline (one row per rank) and per-rank memory; --trace writes a Perfetto trace"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from slimpipe.commands.simulate import add_workload_arguments

    add_workload_arguments(parser)
    out = parser.add_argument_group("output")
    out.add_argument("-o", "--output", default="timeline.png", help="image file (default timeline.png)")
    out.add_argument("--trace", metavar="OUT.json", help="also write the simulated step as a Chrome trace")
    out.add_argument("--measured", metavar="RUN.trace.json",
                     help="Chrome trace of a real run (X events, pid = rank) to draw beside the simulation")
    out.add_argument("--no-image", action="store_true", help="skip the image (with --trace: trace only)")
    out.add_argument("--ranks", metavar="LIST", help="draw only these pipeline ranks, e.g. 0-3,15")
    out.add_argument("--steps", metavar="A:B",
                     help="zoom on each rank's compute steps A…B−1 (the columns of `slimpipe show`, no "
                          "send/recv) and the time they span")
    out.add_argument("--overwrite", action="store_true", help="replace existing output files")


def run(args: argparse.Namespace) -> int:
    from slimpipe.commands.simulate import evaluate_from_args
    from slimpipe.config import ConfigError
    from slimpipe.trace import read_chrome_trace, write_chrome_trace

    _check_outputs(args)
    view = _view(args)  # checked before the simulation
    measured = None
    if args.measured:
        try:
            measured = read_chrome_trace(args.measured)
        except ValueError as exc:
            raise ConfigError(f"--measured: {exc}; pass a trace written by `slimpipe train`") from None
    ev = evaluate_from_args(args)
    written = []
    if args.trace:
        from slimpipe.plot import memory_counters, simulated_trace_events

        write_chrome_trace(simulated_trace_events(ev), args.trace, counters=memory_counters(ev))
        written.append(args.trace)
    if not args.no_image:
        from slimpipe.plot import plot_timeline

        wl = ev.workload
        title = (f"{wl.model.name} s={wl.seq_len} {ev.schedule.name} p{wl.parallel.pp} m{wl.microbatches} "
                 f"n{wl.parallel.slices} v{wl.parallel.vpp}")
        for note in plot_timeline(ev, args.output, measured=measured, title=title, view=view):
            sys.stdout.write(f"warning: {note}\n")
        written.append(args.output)
    sys.stdout.write(f"wrote {', '.join(written) or 'nothing'}\n")
    return 0


def _view(args: argparse.Namespace):  # -> slimpipe.plot.View
    """--ranks and --steps as a View, checked against p and the step count; matplotlib checked too, all
    before the simulation runs."""
    from slimpipe.config import ConfigError
    from slimpipe.plot import View

    if not args.no_image:
        try:
            import matplotlib  # noqa: F401  (optional extra)
        except ModuleNotFoundError:
            raise ConfigError("plotting needs matplotlib: pip install -e '.[plot]' in a slimpipe checkout "
                              "(or pip install matplotlib), or use --no-image") from None
    ranks = steps = None
    if args.ranks:
        ranks = _rank_list(args.ranks, args.pp)
    if args.steps:
        first, sep, last = args.steps.partition(":")
        if not (sep and first.isdigit() and last.isdigit() and int(first) < int(last)):
            raise ConfigError(f"--steps={args.steps!r} must be A:B with integers 0 ≤ A < B, e.g. --steps 0:40")
        steps = (int(first), int(last))
    return View(ranks=ranks, steps=steps)


def _rank_list(text: str, p: int) -> tuple[int, ...]:
    """'0-3,15' → (0, 1, 2, 3, 15), each in [0, p)."""
    from slimpipe.config import ConfigError

    out: list[int] = []
    for part in text.split(","):
        lo, sep, hi = part.strip().partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()):
            raise ConfigError(f"--ranks={text!r} must be ranks or ranges like 0-3,15")
        out += range(int(lo), int(hi if sep else lo) + 1)
    bad = [r for r in out if r >= p]
    if bad or not out:
        raise ConfigError(f"--ranks={text!r} names rank {bad[0] if bad else '?'}, but --pp={p} has ranks "
                          f"0…{p - 1}: pick ranks below {p}")
    return tuple(dict.fromkeys(out))


def _check_outputs(args: argparse.Namespace) -> None:
    """Before simulating: every output is a writable new file (or --overwrite) of a known type."""
    from slimpipe.config import ConfigError
    from slimpipe.outputs import check_output_file

    if args.no_image and not args.trace:
        raise ConfigError("--no-image without --trace writes nothing: drop --no-image or add --trace "
                          "OUT.json")
    if args.trace:
        check_output_file(args.trace, "--trace", overwrite=args.overwrite)
    if not args.no_image:  # matplotlib itself is checked by _view
        check_output_file(args.output, "-o", overwrite=args.overwrite, suffixes=IMAGE_TYPES)
        if args.trace and Path(args.trace).resolve() == Path(args.output).resolve():
            raise ConfigError(f"-o and --trace are the same file {args.output}: give them different paths")
