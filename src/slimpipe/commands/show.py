"""`slimpipe show`: print a schedule as a rank × step grid (or CSV/JSON), compute-only or lowered."""

from __future__ import annotations

import argparse
import sys

__all__ = ["HELP", "add_arguments", "run"]

HELP = "print a pipeline schedule as a rank × step text grid (--csv / --json for editable dumps)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from slimpipe.schedule.builders import BUILDERS, WARMUPS

    parser.add_argument("--schedule", default="slimpipe", choices=sorted(BUILDERS), help="builder")
    parser.add_argument("--pp", type=int, default=4, help="p: pipeline ranks (default 4)")
    parser.add_argument("--microbatches", type=int, default=2, help="m: micro-batches (default 2)")
    parser.add_argument("--slices", type=int, default=1, help="n: slices per sequence (default 1)")
    parser.add_argument("--vpp", type=int, default=1, help="v: virtual stages per rank (default 1)")
    parser.add_argument("--warmup", default="auto", choices=WARMUPS,
                        help="auto: single for unsliced non-interleaved (1F1B), the authors' double otherwise; seq1f1b single")
    parser.add_argument("--lowered", action="store_true", help="show SEND/RECV actions too")
    parser.add_argument("--max-actions", type=int, default=None, metavar="N",
                        help="refuse schedules of more than N estimated actions (default 2,000,000; 0 = no "
                             "limit)")
    fmt = parser.add_mutually_exclusive_group()
    fmt.add_argument("--csv", action="store_true", help="CSV (one row per rank, with a metadata line)")
    fmt.add_argument("--json", action="store_true", help="JSON (metadata + per-rank action lists)")


def run(args: argparse.Namespace) -> int:
    from slimpipe.rules import check_size
    from slimpipe.schedule import format as fmt
    from slimpipe.schedule.builders import build
    from slimpipe.schedule.passes import lower
    from slimpipe.sim.memory import peak_inflight

    check_size(args.pp, args.microbatches, args.slices, args.vpp, limit=args.max_actions)
    sched = build(args.schedule, p=args.pp, m=args.microbatches, n=args.slices, v=args.vpp,
                  warmup=args.warmup)
    if args.lowered:
        sched = lower(sched)
    if args.csv:
        sys.stdout.write(fmt.to_csv(sched))
    elif args.json:
        sys.stdout.write(fmt.to_json(sched))
    else:
        peaks = ", ".join(f"{x:g}" for x in peak_inflight(sched))
        sys.stdout.write(
            f"{sched.name}: p={sched.num_ranks} m={sched.num_microbatches} n={sched.num_slices} "
            f"v={sched.virtual_stages} w={sched.meta.w} g={sched.meta.g}; "
            f"peak in-flight units per rank: {peaks}\n" + fmt.to_grid(sched).rstrip("\n") + "\n"
        )
    return 0
