"""Where the page faults left with freed memory kept come from: the heap growing to its high-water mark.

The validation harness's processes (two forked single-threaded gloo ranks, one sequence length's
configurations, a warm step before each timed one, configurations in a fixed order) run ``--rounds``
rounds; per timed step and rank: the F/B thread CPU time, the minor page faults, and how far the heap's
end (``sbrk(0)``, glibc's main arena) moved. With ``runtime/host_memory.py``'s settings a fault is a
first touch of a page the heap has just grown into, so faults × 4 KiB ≈ the heap's growth, and once the
heap stops growing the faults stop (BENCHMARKS.md "Simulator validation", G):

    python -m bench.heap_growth_probe --profile cpu.json --seq-len 4096 --rounds 5     # ≈ 2 min on 2 cores
"""

from __future__ import annotations

import argparse
import ctypes
import os
import resource

import torch.distributed as dist

from bench import validate_sim as vs
from bench.validate_runs import fb_cpu_s, runtimes
from slimpipe.calibrate import fork_gloo
from slimpipe.config import load_model
from slimpipe.sim.hardware import load_profile

__all__ = ["main"]

_LIBC = ctypes.CDLL(None)
_LIBC.sbrk.restype = ctypes.c_void_p


def _heap_end() -> int:
    return int(_LIBC.sbrk(0))


def _rank(rank: int, world: int, model, cases, schedules, rounds: int) -> list[list[tuple[float, float, int, int]]]:
    """Per case and round: (step s, this rank's F/B CPU s, minor page faults, heap growth bytes)."""
    _, rts, data = runtimes(model, schedules, cases)
    out: list[list] = [[] for _ in cases]
    for _ in range(rounds):
        for i in range(len(cases)):
            dist.barrier()
            rts[i].train_step(data[i])  # the warm step of the same configuration
            dist.barrier()
            f0, h0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, _heap_end()
            res = rts[i].train_step(data[i])
            faults, grown = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0, _heap_end() - h0
            out[i].append((res.step_time_s, fb_cpu_s(res), faults, grown))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--profile", required=True, help="profile JSON of `slimpipe calibrate` (for the schedules)")
    ap.add_argument("--seq-len", type=int, default=4096, help="which family of the validation (512, 2048, 4096)")
    ap.add_argument("--rounds", type=int, default=5, help="rounds over the family's configurations (default 5)")
    a = ap.parse_args(argv)
    if not os.path.isfile(a.profile):
        ap.error(f"--profile={a.profile}: no such file; make one with `slimpipe calibrate -o cpu.json`")
    hw, model = load_profile(a.profile), load_model("tiny")
    cases = [c for c in vs.DEFAULT_CASES if c.seq_len == a.seq_len]
    if not cases:
        ap.error(f"--seq-len={a.seq_len}: the validation has families at 512, 2048 and 4096")
    scheds = [vs.predict(c, model, hw)["schedule"] for c in cases]
    ranks = fork_gloo(_rank, 2, model, cases, scheds, a.rounds, timeout_s=1800.0)
    print("| schedule | round | step s | F/B CPU s r0, r1 | faults r0, r1 | heap growth MiB r0, r1 |")
    print("|---|---|---|---|---|---|")
    for i, c in enumerate(cases):
        for k in range(a.rounds):
            r0, r1 = ranks[0][i][k], ranks[1][i][k]
            print(f"| {c.label} | {k + 1} | {r0[0]:.3f} | {r0[1]:.3f}, {r1[1]:.3f} | {r0[2]}, {r1[2]} | "
                  f"{r0[3] / 2**20:.1f}, {r1[3] / 2**20:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
