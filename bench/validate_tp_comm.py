"""Does the simulator price tensor parallelism right? TP collectives and TP steps, measured vs predicted.

Two kinds of rows, against a profile written by ``slimpipe calibrate`` (which fits a ring,
``latency·(T−1) + bytes·(T−1)/T / bandwidth``, through all-gathers and reduce-scatters timed on 4 forked
gloo ranks at T = 2 and 4):

* **collectives**: the sequence-parallel all-gather and reduce-scatter of runtime/tensor_parallel.py at
  the slice sizes of the step rows (fresh measurements, 4 forked ranks, one thread each; the slowest rank's
  median) vs the simulator's per-collective time (``AnalyticCost._layer_comm``) with the calibrated ring,
  and with the p2p link it rang over before calibrate measured the collectives;
* **steps**: real ``train_step``s of 2 ranks as t2·p1 and t1·p2, and of one process (t1·p1), one thread
  per rank, median of ``--steps`` after one warm-up, vs ``slimpipe simulate`` with the profile. Only
  layouts of ≤ 2 ranks: the simulator gives every rank its own device, which 2 cores give 2 ranks at most.
  In the t2 runs the TP collectives are timed inside the step (a wrapper around the two functions of
  runtime/tensor_parallel.py, this bench only): measured seconds per step and per collective against the
  simulator's count × per-collective time.

    slimpipe calibrate --threads 1 -o cpu.json
    flock /work/measure.lock python bench/validate_tp_comm.py --profile cpu.json [--json out.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics

import torch

from slimpipe.config import ModelConfig, ParallelConfig
from slimpipe.runtime.forked import run_forked
from slimpipe.schedule.builders import build
from slimpipe.sim.cost import AnalyticCost
from slimpipe.sim.evaluate import evaluate
from slimpipe.sim.hardware import Hardware, load_profile
from slimpipe.sim.workload import Workload

__all__ = ["main", "MODEL", "STEPS"]

# tiny's shapes (h 128, f 384, L 8, V 256) with 8/4 heads so that t = 4 divides them
MODEL = ModelConfig(name="tiny-tp", num_layers=8, hidden=128, ffn=384, num_heads=8, num_kv_heads=4, head_dim=16,
                    vocab_size=256)
# (t, p, s, n, m)
STEPS = [(1, 1, 2048, 4, 2), (2, 1, 2048, 4, 2), (1, 2, 2048, 4, 2),
         (1, 1, 4096, 4, 2), (2, 1, 4096, 4, 2), (1, 2, 4096, 4, 2)]
SLICES = (128, 512, 2048)  # tokens per slice of the collective rows


def _collective_body(rank: int, world: int, shapes: list[tuple[int, int]], reps: int) -> list[dict]:
    import time

    import torch.distributed as dist

    from slimpipe.runtime.tensor_parallel import TensorParallel, all_gather_seq, reduce_scatter_seq

    out = []
    for t in (2, 4):
        group, _ = dist.new_subgroups_by_enumeration([list(range(g, g + t)) for g in range(0, world, t)])
        tp = TensorParallel(group=group, size=t, rank=rank % t)
        for tokens, hidden in shapes:
            shard, full = torch.zeros(1, tokens // t, hidden), torch.zeros(1, tokens, hidden)
            for op, fn, x in (("all_gather", all_gather_seq, shard), ("reduce_scatter", reduce_scatter_seq, full)):
                times = []
                for r in range(reps + 1):
                    dist.barrier()
                    t0 = time.perf_counter()
                    fn(x, tp)
                    if r:
                        times.append(time.perf_counter() - t0)
                out.append({"t": t, "tokens": tokens, "op": op, "s": statistics.median(times)})
    return out


def collectives(hw: Hardware, reps: int) -> list[dict]:
    shapes = [(tokens, MODEL.hidden) for tokens in SLICES]
    ranks = run_forked(_collective_body, 4, shapes, reps, timeout_s=600.0)
    plain = dataclasses.replace(hw, profile=dataclasses.replace(hw.profile, tp_bandwidth=0.0, tp_latency_s=0.0))
    rows = []
    for points in zip(*ranks):
        p0 = points[0]
        meas = max(p["s"] for p in points)
        pred = _one_collective(hw, p0["t"], p0["tokens"])
        rows.append({**p0, "s": meas, "bytes": p0["tokens"] * MODEL.hidden * 4, "predicted_s": pred,
                     "predicted_p2p_ring_s": _one_collective(plain, p0["t"], p0["tokens"])})
    return rows


def _one_collective(hw: Hardware, t: int, tokens: int) -> float:
    wl = Workload(model=MODEL, parallel=ParallelConfig(tp=t), seq_len=tokens, global_batch=1)
    return AnalyticCost(wl, hw, (1.0,))._layer_comm(0)[0]


def _timed_collectives() -> list[float]:
    """Wrap all_gather_seq / reduce_scatter_seq of runtime/tensor_parallel.py (its callers look them up in
    the module): [seconds, calls] accumulated from now on in this process."""
    import time

    from slimpipe.runtime import tensor_parallel as tpm

    acc = [0.0, 0.0]

    def timed(fn):
        def run(*args, **kw):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kw)
            finally:
                acc[0] += time.perf_counter() - t0
                acc[1] += 1
        return run

    tpm.all_gather_seq, tpm.reduce_scatter_seq = timed(tpm.all_gather_seq), timed(tpm.reduce_scatter_seq)
    return acc


def _step_body(rank: int, world: int, cases: list, steps: int) -> list:
    from slimpipe.runtime import OptimConfig, ParallelState, PipelineRuntime
    import torch.distributed as dist

    acc = _timed_collectives()
    out = []
    for t, p, s, n, m in cases:
        if t * p != world:
            out.append(None)
            continue
        state = ParallelState.create(pp=p, tp=t, timeout_s=600.0)
        rt = PipelineRuntime(MODEL, build("slimpipe", p=p, m=m, n=n), state, seed=0, optim=OptimConfig(lr=1e-4))
        toks = torch.randint(0, MODEL.vocab_size, (m, s + 1), generator=torch.Generator().manual_seed(1))
        times, comm, calls = [], [], 0.0
        for r in range(steps + 1):
            dist.barrier()
            acc[0] = acc[1] = 0.0
            res = rt.train_step(toks)
            if r:
                times.append(res.step_time_s)
                comm.append(acc[0])
                calls = acc[1]
        out.append((statistics.median(times), statistics.median(comm), calls))
    return out


def step_rows(hw: Hardware, steps: int) -> list[dict]:
    rows = []
    for world in sorted({t * p for t, p, *_ in STEPS}):
        got = run_forked(_step_body, world, STEPS, steps, timeout_s=1800.0)
        for i, case in enumerate(STEPS):
            if got[0][i] is None:
                continue
            t, p, s, n, m = case
            meas, calls = max(g[i][0] for g in got), got[0][i][2]
            comm = max(g[i][1] for g in got)  # the rank that waited longest in its collectives
            wl = Workload(model=MODEL, parallel=ParallelConfig(tp=t, pp=p, slices=n), seq_len=s, global_batch=m)
            pred = evaluate(wl, "slimpipe", hardware=hw).report.pipeline_time_s
            one = _one_collective(hw, t, s // n) if t > 1 else 0.0
            rows.append({"t": t, "p": p, "s": s, "n": n, "m": m, "measured_step_s": meas, "predicted_step_s": pred,
                         "collectives": calls, "measured_comm_s": comm, "predicted_comm_s": calls * one})
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", required=True)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--json", default="")
    ap.add_argument("--skip-collectives", action="store_true", help="step rows only")
    args = ap.parse_args(argv)
    hw = load_profile(args.profile)
    prof = hw.profile
    print(f"profile: TP ring {prof.tp_latency_s * 1e3:.3f} ms/step + bytes / {prof.tp_bandwidth / 1e9:.2f} GB/s; "
          f"p2p {prof.p2p_latency_s * 1e3:.3f} ms + bytes / {prof.p2p_bandwidth / 1e9:.2f} GB/s")
    col = [] if args.skip_collectives else collectives(hw, args.reps)
    print("| T | slice tokens | bytes (full slice) | op | measured ms | predicted ms | pred/meas | "
          "p2p-ring pred ms (before) | pred/meas |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in col:
        print(f"| {r['t']} | {r['tokens']} | {r['bytes'] / 1024:.0f} KiB | {r['op']} | {r['s'] * 1e3:.3f} | "
              f"{r['predicted_s'] * 1e3:.3f} | {r['predicted_s'] / r['s']:.2f} | "
              f"{r['predicted_p2p_ring_s'] * 1e3:.3f} | {r['predicted_p2p_ring_s'] / r['s']:.2f} |")
    st = step_rows(hw, args.steps)
    print("\n| t | p | s | n | m | step measured s | predicted s | pred/meas | TP collectives per step | "
          "TP comm measured s | predicted s | pred/meas |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in st:
        comm = (f"{r['collectives']:.0f} | {r['measured_comm_s']:.3f} | {r['predicted_comm_s']:.3f} | "
                f"{r['predicted_comm_s'] / r['measured_comm_s']:.2f}" if r["t"] > 1 else " | | | ")
        print(f"| {r['t']} | {r['p']} | {r['s']} | {r['n']} | {r['m']} | {r['measured_step_s']:.3f} | "
              f"{r['predicted_step_s']:.3f} | {r['predicted_step_s'] / r['measured_step_s']:.2f} | {comm} |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"collectives": col, "steps": st}, fh, indent=1)


if __name__ == "__main__":
    main()
