"""Time one `slimpipe simulate --json` command under two source trees, alternating, in one run.

    flock /work/measure.lock python bench/ab_simulate.py --a <old checkout>/src --b src --rounds 6

Each round runs the command once per tree, in alternating order, as a fresh process (Python start-up and
imports included) with ``PYTHONPATH`` pointing at that tree; it reports the CLI wall time and the JSON's
``sim_wall_s`` (build + lower + placement + simulate + memory), best and median per tree, and the ratio
b / a of the medians. Then, less sensitive to the load of a shared machine, the CPU time of the command run
in-process (``time.process_time`` around ``slimpipe.cli.main``; a warm-up run first, best of 3 per round).
The default command is the 2048K headline with ``--vocab-parallel``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HEADLINE = ("--model llama-70b --seq-len 2097152 --global-batch 8 --tp 4 --cp 4 --pp 16 --dp 1 --slices 64 "
            "--vpp 5 --recompute partial+fc1 --offload 0.75 --vocab-parallel --gpus 256")


def _once(src: str, argv: list[str]) -> tuple[float, float]:
    env = {**os.environ, "PYTHONPATH": src}
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "slimpipe", "simulate", *argv, "--json"], env=env,
                         capture_output=True, text=True, check=True, timeout=600)
    wall = time.perf_counter() - t0
    return wall, float(json.loads(out.stdout)["sim_wall_s"])


_CPU = """
import contextlib, io, sys, time
from slimpipe.cli import main
argv = sys.argv[1:]
times = []
for _ in range(4):
    t0 = time.process_time()
    with contextlib.redirect_stdout(io.StringIO()):
        main(argv)
    times.append(time.process_time() - t0)
print(min(times[1:]))
"""


def _cpu(src: str, argv: list[str]) -> float:
    env = {**os.environ, "PYTHONPATH": src}
    out = subprocess.run([sys.executable, "-c", _CPU, "simulate", *argv, "--json"], env=env,
                         capture_output=True, text=True, check=True, timeout=600)
    return float(out.stdout.strip())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--a", required=True, help="first source tree (e.g. the old checkout's src)")
    ap.add_argument("--b", required=True, help="second source tree")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--args", default=HEADLINE, help="simulate arguments (default: the 2048K headline)")
    args = ap.parse_args(argv)
    for src in (args.a, args.b):
        if not os.path.isdir(os.path.join(src, "slimpipe")):
            print(f"error: {src} has no slimpipe package: give a source tree (…/src)", file=sys.stderr)
            return 2
    runs: dict[str, list[tuple[float, float]]] = {"a": [], "b": []}
    load = os.getloadavg()[0]
    for r in range(args.rounds):
        order = ("a", "b") if r % 2 == 0 else ("b", "a")
        for which in order:
            runs[which].append(_once(getattr(args, which), args.args.split()))
    print(f"{args.rounds} alternating rounds, load {load:.1f} → {os.getloadavg()[0]:.1f}")
    med = {}
    for which in ("a", "b"):
        walls, sims = [w for w, _ in runs[which]], [s for _, s in runs[which]]
        med[which] = (statistics.median(walls), statistics.median(sims))
        print(f"{which}: CLI wall best {min(walls):.2f} s / median {med[which][0]:.2f} s; sim_wall_s best "
              f"{min(sims):.2f} s / median {med[which][1]:.2f} s")
    print(f"b / a (medians): CLI wall {med['b'][0] / med['a'][0]:.3f}, sim_wall_s {med['b'][1] / med['a'][1]:.3f}")
    cpu: dict[str, list[float]] = {"a": [], "b": []}
    for r in range(args.rounds):
        for which in (("a", "b") if r % 2 == 0 else ("b", "a")):
            cpu[which].append(_cpu(getattr(args, which), args.args.split()))
    for which in ("a", "b"):
        print(f"{which}: in-process CPU best {min(cpu[which]):.3f} s / median {statistics.median(cpu[which]):.3f} s")
    print(f"b / a (in-process CPU, medians): {statistics.median(cpu['b']) / statistics.median(cpu['a']):.3f}; "
          f"paired per round: {statistics.median(b / a for a, b in zip(cpu['a'], cpu['b'])):.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
