"""The measuring half of ``bench/validate_sim.py``: two forked single-threaded gloo ranks per group of rows
(``cases``: its ``Case`` objects; this module does not import it back).

Each group (one (p, c, s)) runs in its own pair of processes. Rounds alternate the configurations
round-robin, each timed step right after a warm step of the same configuration. Warm-up rounds repeat
until the process heap stops growing: with freed memory kept (``runtime/host_memory.py``) the only page
faults left are the heap's first growth to its high-water mark, and when configurations of different
sizes alternate that growth goes on for 2–4 rounds — 1.5K–11K faults in a step, each ≈ 50–85 µs of CPU
on the development VM (the hypervisor backs a page on its first touch), +20–30 % on that step's F/B time
(BENCHMARKS.md "Simulator validation", G). A training job pays this in its first steps only; the
simulator predicts the steady state, so the timed rounds start once no step of a warm-up round faulted
``SETTLED_FAULTS`` pages on either rank (at most ``settle`` rounds).
"""

from __future__ import annotations

import resource
import statistics
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from slimpipe.calibrate import fork_gloo
from slimpipe.calibrate.executor import measure_executor, message_costs
from slimpipe.schedule.actions import Kind, Schedule, parse_action

if TYPE_CHECKING:
    from slimpipe.config import ModelConfig

__all__ = ["SETTLED_FAULTS", "fb_cpu_s", "measure", "runtimes"]

SETTLED_FAULTS = 256
"""Minor page faults per step (1 MiB) under which a warm-up round counts as settled: a settled step of
every schedule here faults 2–70 pages, a growing heap 1,000 or more."""


def _faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def runtimes(model: ModelConfig, schedules: list[Schedule], cases: list) -> tuple:
    """This rank's process group, one runtime per schedule and each case's token batch (the same on
    both ranks: one seeded generator): (state, runtimes, data)."""
    from slimpipe.runtime import OptimConfig, ParallelState, PipelineRuntime

    state = ParallelState.create(pp=cases[0].pp, cp=cases[0].cp, timeout_s=600.0)
    rts = [PipelineRuntime(model, s, state, seed=0, optim=OptimConfig(lr=1e-4)) for s in schedules]
    gen = torch.Generator().manual_seed(1)
    data = [torch.randint(0, model.vocab_size, (c.microbatches, c.seq_len + 1), generator=gen) for c in cases]
    return state, rts, data


def fb_cpu_s(res) -> float:
    """This rank's F/B thread CPU time in a step (load-independent, unlike the trace's wall times)."""
    return sum(e.cpu_s for e in res.trace if parse_action(e.action).kind in (Kind.F, Kind.B))


def _round(rts, data, rnd: int, warm: int) -> tuple[list[tuple], int]:
    """One round over the configurations (order rotated by ``rnd``): per configuration (its index, the
    timed step's result, this rank's minor page faults in it), and the most faults of any step."""
    order = list(range(len(rts)))
    order = order[rnd % len(order):] + order[: rnd % len(order)]
    out, most = [], 0
    for i in order:
        for _ in range(warm):  # steady state: the step before runs the same configuration
            dist.barrier()
            f0 = _faults()
            rts[i].train_step(data[i])
            most = max(most, _faults() - f0)
        dist.barrier()  # both ranks start the step together, as the simulator's clocks do
        f0 = _faults()
        res = rts[i].train_step(data[i])
        out.append((i, res, _faults() - f0))
        most = max(most, out[-1][2])
    return out, most


def _settled(most: int) -> bool:
    """Whether no step of the round faulted SETTLED_FAULTS pages on any rank (one collective)."""
    worst = torch.tensor([float(most)])
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    return float(worst) < SETTLED_FAULTS


def _rank_body(rank: int, world: int, model: ModelConfig, schedules: list[Schedule], cases: list,
               steps: int, warm: int, settle: int) -> tuple[list[dict], int]:
    state, rts, data = runtimes(model, schedules, cases)
    # warm-up rounds (allocator, mask tables, the heap's growth to its high-water mark); the first runs
    # each configuration once, the others with its warm steps, as the timed rounds do
    for warm_rounds in range(1, max(settle, 1) + 1):
        if _settled(_round(rts, data, warm_rounds - 1, warm if warm_rounds > 1 else 0)[1]):
            break
    rnd = warm_rounds
    rec: list[list] = [[] for _ in cases]
    for _ in range(steps):
        for i, res, faults in _round(rts, data, rnd, warm)[0]:
            rec[i].append((res, faults))
        rnd += 1
    return [{"step_s": [r.step_time_s for r, _ in rs], "bubble": [r.bubble_ratio for r, _ in rs],
             "busy_s": [r.busy_s[state.pp_rank] for r, _ in rs], "faults": [f for _, f in rs],
             "cpu_busy_s": [fb_cpu_s(r) for r, _ in rs],
             "act": rs[0][0].peak_activation_bytes, "loss": rs[0][0].loss,
             "traces": [[(e.action, e.start_s, e.end_s, e.cpu_s) for e in r.trace] for r, _ in rs]}
            for rs in rec], warm_rounds


def measure(cases: list, model: ModelConfig, schedules: list[Schedule], steps: int,
            warm: int = 1, executor: tuple | None = None, settle: int = 8) -> tuple[list[dict], list[list[dict]]]:
    """Median figures per case from two single-threaded gloo ranks, one pair of processes per (p, c, s):
    a training job's processes hold one sequence length's buffers, and mixing s = 4096 runtimes into the
    processes of s = 512 ones made the small units 7–15 % slower in CPU time (BENCHMARKS.md "Simulator
    validation", E), a cost no single job pays. With ``executor`` (calibrate's executor runs and reps),
    calibrate's 2-rank executor run is repeated before the first group and after every group: the passes
    around each group, per group (the second list). ``settle``: at most this many warm-up rounds."""
    out: list[dict | None] = [None] * len(cases)
    groups = list(dict.fromkeys((c.pp, c.cp, c.seq_len) for c in cases))
    passes = [measure_executor(model, *executor)] if executor else []
    around = []
    for group in groups:
        idx = [i for i, c in enumerate(cases) if (c.pp, c.cp, c.seq_len) == group]
        assert group[0] * group[1] == 2, f"{group[:2]}: the validation runs on two ranks"
        for i, row in zip(idx, _measure(cases, idx, model, schedules, steps, warm, settle)):
            out[i] = row
        if executor:
            passes.append(measure_executor(model, *executor))
            around.append(passes[-2:])
    return out, around  # type: ignore[return-value]


def _measure(cases: list, idx: list[int], model: ModelConfig, schedules: list[Schedule],
             steps: int, warm: int, settle: int) -> list[dict]:
    ranks = fork_gloo(_rank_body, 2, model, [schedules[i] for i in idx], [cases[i] for i in idx], steps, warm,
                      settle, timeout_s=1800.0)
    med = statistics.median
    (rows0, warm_rounds), (rows1, _) = ranks
    out = []
    for r0, r1 in zip(rows0, rows1):
        sends, late = [], []
        for t0, t1 in zip(r0["traces"], r1["traces"]):
            s, lt = message_costs([t0, t1])
            sends, late = sends + s, late + lt
        out.append({"step_s": med(r0["step_s"]), "step_s_all": r0["step_s"], "bubble": med(r0["bubble"]),
                    "busy_s": [med(r0["busy_s"]), med(r1["busy_s"])],
                    "cpu_busy_s": [med(r0["cpu_busy_s"]), med(r1["cpu_busy_s"])], "act": r0["act"],
                    "faults": [med(r0["faults"]), med(r1["faults"])], "warm_rounds": warm_rounds,
                    "loss": r0["loss"], "send_s": med(sends) if sends else 0.0,
                    "late_recv_s": med(late) if late else 0.0, "late_recvs": len(late)})
    return out
