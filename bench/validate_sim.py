"""Does the simulator predict real runs? Real training steps vs `slimpipe simulate` with a calibrated profile.

Two gloo ranks (fork, FileStore, one thread each — the same harness as the tests) train the same model
with several schedules, sequence lengths and slice counts. Per configuration the measured figures are
medians over ``--steps`` timed steps (warm-up rounds first, until the heap stops growing; configurations
alternate round-robin so machine noise hits all of them alike; ``bench/validate_runs.py``):

* step time: ``StepResult.step_time_s`` (schedule execution, slowest rank; the optimizer step is outside
  it, as it is outside the simulator's pipeline makespan), against the simulator's makespan with the
  profile's cost model (``AnalyticCost`` + ``hardware.profile``);
* non-compute time: step time − the busiest rank's F/B time, measured and predicted (the predicted F/B
  time taken without message costs, so the compute prediction's own error drops out): bubbles plus what
  messages cost, with and without the profile's message costs;
* p2p message costs from both ranks' executor traces: the wall time of a SEND, and of a *late* RECV (one
  posted after its SEND: gloo's rendezvous), against the profile's ``p2p_send_s`` / ``p2p_recv_s``;
* bubble ratio: ``1 − Σ busy / (p · step time)`` from the runtime, against the simulated timeline's;
* peak activation bytes per rank (saved-for-backward + K/V buffers + dK/dV accumulators, the runtime's
  own accounting), against a prediction that walks each rank's lowered program with the runtime's
  storage layout: per unit ``T·(l·a + a_stage)`` saved bytes with a, a_stage *measured by calibrate for
  one unit* (ActivationFootprint), the K/V buffer of a whole sequence per (stage, micro-batch) from its
  first slice forward to its last slice backward, and the dK/dV accumulator (rows of all but the last
  slice) from the first slice backward on. The published formula (bf16, flash attention, Megatron
  tensors) describes another storage format; its schedule ratios are reported beside it.

Calibrate's 2-rank executor run (its seven configurations, F/B units of 8 … 2048 tokens) is repeated
before the first sequence length's rows and after each one's; every row is predicted with the profile's
executor terms (κ curve, per-action overhead, message costs, gap between actions) refitted from the mean
of the two passes around it, the kernel terms staying the profile's (``--no-rerun-executor``: the
profile alone, also reported per row). The development VM's speed per CPU second drifts 1.3–1.6× within
an hour for identical work, so a profile measured minutes earlier predicts a different machine
(BENCHMARKS.md "Simulator validation", E and F).

    python -m bench.validate_sim --profile cpu1.json --json out.json --markdown out.md

Without ``--profile`` it first runs ``slimpipe calibrate --threads 1`` (the ranks are single-threaded).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from dataclasses import dataclass

import torch

from bench.validate_runs import measure
from slimpipe.calibrate import GRIDS
from slimpipe.calibrate.executor import mean_pass
from slimpipe.calibrate.fit import refit_executor
from slimpipe.config import ConfigError, ModelConfig, ParallelConfig, load_model
from slimpipe.schedule.actions import Kind, Schedule
from slimpipe.schedule.passes import lower
from slimpipe.sim.evaluate import evaluate
from slimpipe.sim.hardware import ActivationFootprint, Hardware, load_profile
from slimpipe.sim.workload import Workload

__all__ = ["Case", "DEFAULT_CASES", "QUICK_CASES", "SPLIT_CASES", "predict_activation", "predict", "measure",
           "validate", "markdown", "main"]


@dataclass(frozen=True, kw_only=True, slots=True)
class Case:
    """One configuration: a schedule at one sequence length."""

    schedule: str
    """Builder name."""
    seq_len: int
    """s: tokens per sequence."""
    microbatches: int
    """m: sequences per step."""
    slices: int = 1
    """n."""
    vpp: int = 1
    """v."""
    split: str = "auto"
    """Slice split (``--slice-split``): auto, equal or equal-flop."""
    pp: int = 2
    """p: pipeline ranks."""
    cp: int = 1
    """c: context-parallel ranks (the run has p·c ranks; every layout here has 2)."""

    @property
    def label(self) -> str:
        extra = (f" n={self.slices}" if self.slices > 1 else "") + (f" v={self.vpp}" if self.vpp > 1 else "")
        flop = " equal-flop" if self.split == "equal-flop" and self.schedule != "seq1f1b" else ""
        where = "" if (self.pp, self.cp) == (2, 1) else f" p{self.pp} c{self.cp}"
        return f"{self.schedule}{extra}{flop}{where}"


def _family(s: int, m: int) -> list[Case]:
    return [Case(schedule="1f1b", seq_len=s, microbatches=m),
            *(Case(schedule="slimpipe", seq_len=s, microbatches=m, slices=n) for n in (2, 4, 8)),
            Case(schedule="slimpipe", seq_len=s, microbatches=m, slices=4, vpp=2),
            Case(schedule="interleaved-1f1b", seq_len=s, microbatches=m, vpp=2),
            Case(schedule="seq1f1b", seq_len=s, microbatches=m, slices=4)]


DEFAULT_CASES = _family(512, 4) + _family(2048, 2) + [
    c for c in _family(4096, 2)
    if (c.schedule, c.slices, c.vpp) not in (("slimpipe", 2, 1), ("slimpipe", 4, 2))]  # time budget
QUICK_CASES = [Case(schedule="1f1b", seq_len=128, microbatches=2),
               Case(schedule="slimpipe", seq_len=128, microbatches=2, slices=4)]
# Equal against equal-FLOP slices on the real runtime (BENCHMARKS "Equal-FLOP slices or the exchange").
SPLIT_CASES = [Case(schedule="slimpipe", seq_len=4096, microbatches=2, slices=n, vpp=v, split=split)
               for n, v in ((4, 1), (8, 1), (4, 2)) for split in ("equal", "equal-flop")]


# Context parallelism on two ranks (c = 2, p = 1): query-out's collectives inside every layer.
CP_CASES = [Case(schedule=name, seq_len=s, microbatches=2, slices=n, pp=1, cp=2)
            for s in (2048, 4096) for name, n in (("1f1b", 1), ("slimpipe", 4), ("slimpipe", 8))]


# calibrate's own executor run (its configurations and timed steps), repeated around each group's rows,
# and the profile terms refitted from it (reported per row)
RERUN = (GRIDS["cpu"]["units"], int(GRIDS["cpu"]["executor_reps"]))
EXECUTOR_TERMS = ("compose_curve_fwd", "compose_curve_bwd", "action_fwd_s", "action_bwd_s", "p2p_send_s",
                  "p2p_recv_s", "action_gap_s")

CASE_LISTS = {"default": DEFAULT_CASES, "quick": QUICK_CASES, "split": SPLIT_CASES, "cp": CP_CASES}


# ---- prediction (no torch.distributed) -------------------------------------------------------------------
def predict_activation(schedule: Schedule, model: ModelConfig, seq_len: int,
                       fp: ActivationFootprint) -> list[float]:
    """Per rank: peak of saved + K/V + dK/dV bytes, sampled after every action as the runtime samples."""
    from slimpipe.runtime.stage import slice_bounds

    sched = lower(schedule)
    p, v, n = sched.num_ranks, sched.virtual_stages, sched.num_slices
    layers = model.num_layers // (p * v)
    bounds = slice_bounds(seq_len, sched.slice_fractions())
    last = p * v - 1
    # K/V blocks follow the slices: block j exists from F(j) to B(j); slice n−1's backward hands dK/dV down
    # to every earlier block, whose accumulator lives until that block's own backward.
    kv = [layers * (bounds[j + 1] - bounds[j]) * fp.kv_per_layer for j in range(n)]
    peaks = []
    for prog in sched.ranks:
        cur = best = 0.0
        for a in prog:
            if a.kind in (Kind.F, Kind.B):
                j = a.seq_slice
                t = bounds[j + 1] - bounds[j]
                extra = (fp.first_stage if a.stage == 0 else fp.last_stage if a.stage == last
                         else fp.middle_stage)
                unit = t * (layers * fp.per_layer + extra)
                if a.kind is Kind.F:
                    cur += unit + kv[j]
                else:
                    cur -= unit + kv[j]
                    if j == n - 1:
                        cur += sum(kv[:j])  # dK/dV for blocks 0 … n−2
                    else:
                        cur -= kv[j]  # block j's accumulator, consumed
            best = max(best, cur)
        peaks.append(best)
    return peaks


def predict(case: Case, model: ModelConfig, hw: Hardware) -> dict:
    """Simulated step time, bubble, busy and activation peaks of one case (schedule from evaluate)."""
    wl = Workload(model=model, parallel=ParallelConfig(pp=case.pp, cp=case.cp, vpp=case.vpp, slices=case.slices),
                  seq_len=case.seq_len, global_batch=case.microbatches)
    ev = evaluate(wl, case.schedule, hardware=hw, slice_split=case.split)
    if hw.profile is None or hw.profile.footprint is None:
        raise ConfigError("--profile: no activation footprint in it; recreate it with `slimpipe calibrate`")
    return {"schedule": ev.schedule, "step_s": ev.report.pipeline_time_s, "bubble": ev.report.bubble_ratio,
            "busy_s": list(ev.timeline.busy),
            # a CP rank holds s/c tokens of every slice: the c = 1 storage over its rows
            "act": predict_activation(ev.schedule, model, case.seq_len // case.cp, hw.profile.footprint),
            "published_act": [mb.activations + mb.kv_grad for mb in ev.memory]}


def _without_messages(hw: Hardware) -> Hardware:
    """The same profile without the p2p message costs and the executor's gaps between actions: its F/B busy
    time is what the trace's F/B actions measure."""
    if hw.profile is None:
        return hw
    return dataclasses.replace(hw, profile=dataclasses.replace(hw.profile, p2p_send_s=0.0, p2p_recv_s=0.0,
                                                               action_gap_s=0.0))


def validate(cases: list[Case], model: ModelConfig, hw: Hardware, *, steps: int = 3, warm: int = 1,
             executor: tuple | None = None, settle: int = 8) -> list[dict]:
    """One row per case: measured, predicted and their ratios. ``executor`` = (runs, reps) of calibrate's
    2-rank executor run (``RERUN``): each (p, c, s) group is predicted with the profile's executor terms
    refitted from that run repeated right before and after the group's rows (``refit_executor``; the
    kernel terms stay the profile's). None: every row from the profile alone. ``settle``: at most this many
    warm-up rounds, until the heap stops growing (``bench/validate_runs.py``)."""
    schedules = [predict(c, model, hw)["schedule"] for c in cases]
    meas, around = measure(cases, model, schedules, steps, warm, executor, settle)
    group_hw = {}
    for g, passes in zip(dict.fromkeys((c.pp, c.cp, c.seq_len) for c in cases), around):
        group_hw[g] = refit_executor(hw, model, mean_pass(passes))
    hws = [group_hw.get((c.pp, c.cp, c.seq_len), hw) for c in cases]
    preds = [predict(c, model, h) for c, h in zip(cases, hws)]
    before = [predict(c, model, _without_messages(h)) for c, h in zip(cases, hws)]
    alone = [predict(c, model, hw)["step_s"] for c in cases] if executor else [p["step_s"] for p in preds]
    ref = {(c.seq_len, c.pp, c.cp): i for i, c in reversed(list(enumerate(cases))) if c.schedule == "1f1b"}
    rows = []
    for i, (c, p, m) in enumerate(zip(cases, preds, meas)):
        j = ref.get((c.seq_len, c.pp, c.cp), i)
        rows.append({
            "case": c.label, "schedule": c.schedule, "seq_len": c.seq_len, "m": c.microbatches, "n": c.slices,
            "v": c.vpp, "measured_step_s": m["step_s"], "step_s_all": m["step_s_all"],
            "predicted_step_s": p["step_s"], "step_ratio": p["step_s"] / m["step_s"],
            "step_ratio_without_messages": before[i]["step_s"] / m["step_s"],
            "step_ratio_profile_alone": alone[i] / m["step_s"],  # without the executor rerun
            "executor_refit": {k: getattr(hws[i].profile, k, None) for k in EXECUTOR_TERMS},
            # step − the busiest rank's F/B time: bubbles and messages, free of the compute prediction's error
            "measured_noncompute_s": m["step_s"] - max(m["busy_s"]),
            "predicted_noncompute_s": p["step_s"] - max(before[i]["busy_s"]),
            "predicted_noncompute_s_without_messages": before[i]["step_s"] - max(before[i]["busy_s"]),
            "measured_bubble": m["bubble"], "predicted_bubble": p["bubble"], "measured_busy_s": m["busy_s"],
            "measured_cpu_busy_s": m["cpu_busy_s"], "predicted_busy_s": p["busy_s"],
            "cpu_busy_ratio": [pb / mb for pb, mb in zip(before[i]["busy_s"], m["cpu_busy_s"])],
            "busy_ratio": [pb / mb for pb, mb in zip(before[i]["busy_s"], m["busy_s"])],
            # > 1: the rank was descheduled inside its F/B (other processes' load); the profile's units are
            # thread CPU time of the 2-rank executor run, so this is what the load added to the wall clock.
            "wall_per_cpu": [mb / mc for mb, mc in zip(m["busy_s"], m["cpu_busy_s"])],
            # The step on a CPU clock: the measured step shrunk by both ranks' F/B wall ÷ CPU (first order:
            # bubbles wait on the other rank's stretched compute, so they stretch alike). Equals the wall
            # ratio on a quiet machine; under load it is the comparison the simulator can be held to.
            "step_ratio_cpu": p["step_s"] * sum(m["busy_s"]) / (m["step_s"] * sum(m["cpu_busy_s"])),
            "faults_per_step": m["faults"], "warm_rounds": m["warm_rounds"],  # minor page faults, medians
            "measured_act": m["act"], "predicted_act": p["act"], "measured_send_s": m["send_s"],
            "measured_late_recv_s": m["late_recv_s"], "late_recvs_per_step": m["late_recvs"] / steps,
            "act_ratio": [pa / ma for pa, ma in zip(p["act"], m["act"])],
            "measured_act_vs_1f1b": m["act"][0] / meas[j]["act"][0],
            "published_act_vs_1f1b": p["published_act"][0] / preds[j]["published_act"][0],
        })
    return rows


# ---- reporting -----------------------------------------------------------------------------------------
def markdown(rows: list[dict]) -> str:
    head = ("| s | m | schedule | step meas s | step pred s | pred/meas | pred/meas CPU clock "
            "| pred/meas profile alone "
            "| pred/meas w/o msg, gaps | bubble meas "
            "| bubble pred | non-compute ms meas, pred, w/o msg, gaps | busy pred/meas r0, r1 | wall ÷ CPU busy r0, r1 "
            "| SEND, late RECV ms (n/step) | r0 act meas MiB "
            "| act pred/meas r0, r1 | r0 act ÷ 1f1b meas | published ÷ 1f1b |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        ok = "" if 0.9 <= r["step_ratio"] <= 1.1 else " ✗"
        cook = "" if 0.9 <= r["step_ratio_cpu"] <= 1.1 else " ✗"
        pok = "" if 0.9 <= r["step_ratio_profile_alone"] <= 1.1 else " ✗"
        aok = "" if all(abs(x - 1) <= 0.05 for x in r["act_ratio"]) else " ✗"
        lines.append(
            f"| {r['seq_len']} | {r['m']} | {r['case']} | {r['measured_step_s']:.3f} | "
            f"{r['predicted_step_s']:.3f} | "
            f"{r['step_ratio']:.3f}{ok} | {r['step_ratio_cpu']:.3f}{cook} | "
            f"{r['step_ratio_profile_alone']:.3f}{pok} | "
            f"{r['step_ratio_without_messages']:.3f} | "
            f"{r['measured_bubble']:.1%} | {r['predicted_bubble']:.1%} | "
            f"{r['measured_noncompute_s'] * 1e3:.0f}, {r['predicted_noncompute_s'] * 1e3:.0f}, "
            f"{r['predicted_noncompute_s_without_messages'] * 1e3:.0f} | "
            f"{', '.join(f'{x:.2f}' for x in r['busy_ratio'])} | "
            f"{', '.join(f'{x:.2f}' for x in r['wall_per_cpu'])} | "
            f"{r['measured_send_s'] * 1e3:.2f}, {r['measured_late_recv_s'] * 1e3:.2f} "
            f"({r['late_recvs_per_step']:.0f}) | {r['measured_act'][0] / 2**20:.1f} | {', '.join(f'{x:.4f}' for x in r['act_ratio'])}{aok} | "
            f"{r['measured_act_vs_1f1b']:.3f} | {r['published_act_vs_1f1b']:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--profile", default="", help="profile JSON (default: calibrate now with --threads 1)")
    ap.add_argument("--model", default="tiny", help="model preset or JSON (default tiny)")
    ap.add_argument("--cases", default="default", choices=tuple(CASE_LISTS), help="case list")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per case (median; default 3)")
    ap.add_argument("--warm", type=int, default=1,
                    help="untimed steps of the same configuration right before each timed one (default 1: "
                         "the steady state the simulator predicts; 0: the timed step follows another "
                         "configuration's, as before 2026-12-05)")
    ap.add_argument("--settle", type=int, default=8,
                    help="at most this many warm-up rounds before the timed ones: they repeat until no step "
                         "faults 256 pages (the heap reached its high-water mark; default 8, 1: one round)")
    ap.add_argument("--rerun-executor", action=argparse.BooleanOptionalAction, default=True,
                    help="repeat calibrate's 2-rank executor run before and after each sequence length's "
                         "rows and refit the profile's executor terms from those passes for the rows between "
                         "them (default on: the VM's speed per CPU second drifts 1.3–1.6× within an hour; "
                         "--no-rerun-executor predicts every row from the profile alone)")
    ap.add_argument("--json", default="", help="write rows and run metadata here")
    ap.add_argument("--markdown", default="", help="write the markdown table here")
    a = ap.parse_args(argv)
    try:
        model = load_model(a.model)
        if a.profile:
            hw = load_profile(a.profile)
        else:
            from slimpipe.calibrate import CalibrateOptions, calibrate
            from slimpipe.sim.hardware import profile_from_dict

            doc = calibrate(CalibrateOptions(model=model, threads=1, concurrency=2))
            hw = profile_from_dict(doc, default_name="calibrated", source="calibrate")
        load0, t0 = os.getloadavg(), time.time()
        rows = validate(CASE_LISTS[a.cases], model, hw, steps=a.steps, warm=a.warm, settle=a.settle,
                        executor=RERUN if a.rerun_executor else None)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    meta = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": f"{os.cpu_count()}-core CPU, gloo, torch "
            f"{torch.__version__}", "load_before": load0, "load_after": os.getloadavg(),
            "wall_s": time.time() - t0,
            "profile": a.profile or "calibrated in-process", "model": model.name, "steps": a.steps,
            "warm": a.warm, "settle": a.settle, "rerun_executor": a.rerun_executor,
            "profile_p2p_send_s": hw.profile.p2p_send_s if hw.profile else 0.0,
            "profile_p2p_recv_s": hw.profile.p2p_recv_s if hw.profile else 0.0}
    table = markdown(rows)
    meta["in_band"] = sum(0.9 <= r["step_ratio"] <= 1.1 for r in rows)
    meta["in_band_cpu_clock"] = sum(0.9 <= r["step_ratio_cpu"] <= 1.1 for r in rows)
    meta["in_band_profile_alone"] = sum(0.9 <= r["step_ratio_profile_alone"] <= 1.1 for r in rows)
    print(f"{meta['date']}  {meta['machine']}  load {load0[0]:.2f} → {meta['load_after'][0]:.2f}  "
          f"{meta['wall_s']:.0f} s  step time within 0.9–1.1: {meta['in_band']}/{len(rows)} wall, "
          f"{meta['in_band_cpu_clock']}/{len(rows)} on a CPU clock, "
          f"{meta['in_band_profile_alone']}/{len(rows)} with the profile alone\n{table}")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump({"meta": meta, "rows": rows}, fh, indent=1)
    if a.markdown:
        with open(a.markdown, "w") as fh:
            fh.write(table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
