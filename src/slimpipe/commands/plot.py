"""`slimpipe plot`: draw the simulated timeline and memory curves; optionally write a Chrome/Perfetto trace
and overlay a measured trace from `slimpipe train`."""

from __future__ import annotations

import argparse
import sys

__all__ = ["HELP", "add_arguments", "run"]

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


def run(args: argparse.Namespace) -> int:
    from slimpipe.commands.simulate import evaluate_from_args
    from slimpipe.config import ConfigError
    from slimpipe.trace import read_chrome_trace, write_chrome_trace

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
        try:
            import matplotlib  # noqa: F401  (optional extra)
        except ModuleNotFoundError:
            raise ConfigError(
                "plotting needs matplotlib: pip install 'slimpipe[plot]' (or use --no-image)"
            ) from None
        from slimpipe.plot import plot_timeline

        wl = ev.workload
        title = (f"{wl.model.name} s={wl.seq_len} {ev.schedule.name} p{wl.parallel.pp} m{wl.microbatches} "
                 f"n{wl.parallel.slices} v{wl.parallel.vpp}")
        plot_timeline(ev, args.output, measured=measured, title=title)
        written.append(args.output)
    sys.stdout.write(f"wrote {', '.join(written) or 'nothing'}\n")
    return 0
