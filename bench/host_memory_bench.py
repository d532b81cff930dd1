"""Page faults and step times with glibc's default malloc vs freed memory kept (runtime/host_memory.py).

The validation harness's processes (``bench/validate_sim.py``: two forked single-threaded gloo ranks,
one pair of processes per sequence length, a warm step before each timed one) run the s = 512 and
s = 4096 families twice per arm, arms alternating (``SLIMPIPE_HOST_MALLOC=default`` vs kept); per row
the medians of the step time, of both ranks' F/B thread CPU time and of each rank's minor page faults
per timed step, and the F/B CPU time the profile predicts ÷ measured (BENCHMARKS.md "Simulator
validation", F):

    python -m bench.host_memory_bench --profile cpu.json           # ≈ 7 min on 2 cores
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics

import torch
import torch.distributed as dist

from bench import validate_sim as vs
from slimpipe.calibrate import fork_gloo
from slimpipe.config import load_model
from slimpipe.schedule.actions import Kind, parse_action
from slimpipe.sim.hardware import load_profile

__all__ = ["main"]


def _rank(rank: int, world: int, model, cases, schedules, steps: int) -> list[list[tuple[float, float, int]]]:
    """Per case and timed step: (step seconds, this rank's F/B CPU seconds, minor page faults)."""
    from slimpipe.runtime import OptimConfig, ParallelState, PipelineRuntime

    state = ParallelState.create(pp=2, timeout_s=600.0)
    rts = [PipelineRuntime(model, s, state, seed=0, optim=OptimConfig(lr=1e-4)) for s in schedules]
    gen = torch.Generator().manual_seed(1)
    data = [torch.randint(0, model.vocab_size, (c.microbatches, c.seq_len + 1), generator=gen) for c in cases]
    out: list[list] = [[] for _ in cases]
    for rep in range(steps + 1):  # round 0 warms up
        for i in range(len(cases)):
            dist.barrier()
            rts[i].train_step(data[i])  # the warm step of the same configuration
            dist.barrier()
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            res = rts[i].train_step(data[i])
            faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
            cpu = sum(e.cpu_s for e in res.trace if parse_action(e.action).kind in (Kind.F, Kind.B))
            if rep:
                out[i].append((res.step_time_s, cpu, faults))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--profile", required=True, help="profile JSON of `slimpipe calibrate`")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per case and round (default 3)")
    a = ap.parse_args(argv)
    hw, model = load_profile(a.profile), load_model("tiny")
    plain = vs._without_messages(hw)
    rows: dict[str, list] = {"default": [], "kept": []}
    for arm in ("default", "kept", "kept", "default"):
        os.environ["SLIMPIPE_HOST_MALLOC"] = arm  # read once by each forked rank
        for s in (512, 4096):
            cases = [c for c in vs.DEFAULT_CASES if c.seq_len == s]
            scheds = [vs.predict(c, model, hw)["schedule"] for c in cases]
            ranks = fork_gloo(_rank, 2, model, cases, scheds, a.steps, timeout_s=1800.0)
            for i, c in enumerate(cases):
                pred = vs.predict(c, model, plain)["busy_s"]
                rows[arm].append((c, [r[i] for r in ranks], pred))
    os.environ.pop("SLIMPIPE_HOST_MALLOC")
    med = statistics.median
    print("| s | schedule | step default s | kept s | kept ÷ default | F/B CPU default s | kept s "
          "| kept ÷ default | faults/step r0, r1 default | kept | F/B CPU pred/meas r0, r1 default | kept |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    n = len(rows["default"]) // 2
    for i in range(n):
        c = rows["default"][i][0]
        fig = {}
        for arm in rows:
            runs = [rows[arm][i], rows[arm][i + n]]  # the arm's two rounds
            steps = [x for _, per_rank, _ in runs for x in per_rank[0]]
            per_rank = [[x for _, pr, _ in runs for x in pr[r]] for r in (0, 1)]
            cpu = [med(x[1] for x in pr) for pr in per_rank]
            fig[arm] = (med(x[0] for x in steps), sum(cpu), [med(x[2] for x in pr) for pr in per_rank],
                        [p / m for p, m in zip(runs[0][2], cpu)])
        d, k = fig["default"], fig["kept"]
        print(f"| {c.seq_len} | {c.label} | {d[0]:.3f} | {k[0]:.3f} | {k[0] / d[0]:.3f} | {d[1]:.3f} | "
              f"{k[1]:.3f} | {k[1] / d[1]:.3f} | {d[2][0]:.0f}, {d[2][1]:.0f} | "
              f"{k[2][0]:.0f}, {k[2][1]:.0f} | {d[3][0]:.2f}, {d[3][1]:.2f} | {k[3][0]:.2f}, {k[3][1]:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
