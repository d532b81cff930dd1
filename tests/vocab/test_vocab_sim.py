"""Vocab-parallel in the simulator (collective actions, their durations and lock-step) and on the CLIs."""

from __future__ import annotations

import json

import pytest

from slimpipe.cli import main
from slimpipe.config import ParallelConfig, load_model
from slimpipe.schedule.actions import VOCAB_KINDS, Kind
from slimpipe.schedule.builders import build
from slimpipe.schedule.passes import lower
from slimpipe.schedule.vocab import add_vocab_parallel
from slimpipe.sim import AnalyticCost, DeadlockError, Workload, evaluate, load_hardware, simulate

H800 = load_hardware("h800")


def _workload(vp: bool, **par) -> Workload:
    layout = dict(tp=2, pp=4, slices=4, vpp=1) | par
    return Workload(model=load_model("llama-7b"), parallel=ParallelConfig(**layout), seq_len=32768,
                    global_batch=4, recompute="partial+fc1", vocab_parallel=vp)


def test_end_stages_lose_their_vocabulary_work() -> None:
    ends = AnalyticCost(_workload(False), H800, [0.25] * 4)
    spread = AnalyticCost(_workload(True), H800, [0.25] * 4)
    assert ends.compute_time(Kind.F, 3, 2) > ends.compute_time(Kind.F, 1, 2)  # the head on the last stage
    for kind in (Kind.F, Kind.B):
        times = {spread.compute_time(kind, stage, 2) for stage in range(4)}
        assert len(times) == 1
    head_f = ends.compute_time(Kind.F, 3, 2) - ends.compute_time(Kind.F, 1, 2)
    compute, comm = spread.vocab_time(Kind.VH, 2)
    assert compute == pytest.approx(3 * head_f / 4)  # forward, dW, dX of a quarter of the vocabulary
    assert comm > 0 and spread.vocab_time(Kind.VE, 2)[1] > 0 and spread.vocab_time(Kind.VB, 2)[1] > 0


def test_analytic_timeline_runs_the_collectives_in_lock_step() -> None:
    ev = evaluate(_workload(True), "slimpipe", hardware=H800)
    tl, sched = ev.timeline, ev.schedule
    vh_end: dict[tuple[int, int], set[float]] = {}
    for r, prog in enumerate(sched.ranks):
        for i, a in enumerate(prog):
            if a.kind is Kind.VH:
                vh_end.setdefault((a.microbatch, a.seq_slice), set()).add(tl.end[r][i])
    assert len(vh_end) == 4 * 4
    assert all(len(ends) == 1 for ends in vh_end.values())  # every rank leaves a VH at the same time
    cost = ev.cost
    vocab_busy = 4 * sum(cost.vocab_time(k, j)[0] for k in VOCAB_KINDS for j in range(4))
    for r in range(4):
        fb = sum(e - s for _, s, e in tl.compute_events(r))
        assert tl.busy[r] == pytest.approx(fb + vocab_busy)  # every rank computes its vocabulary share


def test_uniform_cost_keeps_the_published_convention() -> None:
    base = evaluate(_workload(False), "slimpipe", hardware=H800, cost="uniform")
    vp = evaluate(_workload(True), "slimpipe", hardware=H800, cost="uniform")
    assert vp.report.bubble_ratio == base.report.bubble_ratio
    assert not any(a.kind in VOCAB_KINDS for prog in vp.schedule.ranks for a in prog)


def test_simulator_reports_a_rank_missing_a_collective() -> None:
    wl = _workload(True)
    sched = add_vocab_parallel(lower(build("slimpipe", p=4, m=4, n=4)))
    ranks = list(sched.ranks)
    ranks[1] = tuple(a for a in ranks[1] if str(a) != "VH0.3")
    with pytest.raises(DeadlockError, match="every rank to reach it"):
        simulate(sched.replace_ranks(tuple(ranks)), AnalyticCost(wl, H800, sched.slice_fractions()))


def test_cli_flags(capsys) -> None:
    argv = ["simulate", "--model", "llama-7b", "--seq-len", "32768", "--global-batch", "4", "--tp", "2",
            "--pp", "4", "--slices", "4", "--recompute", "partial+fc1", "--json"]
    assert main([*argv, "--vocab-parallel"]) == 0
    on = json.loads(capsys.readouterr().out)
    assert main([*argv, "--no-vocab-parallel"]) == 0
    off = json.loads(capsys.readouterr().out)
    assert on["config"]["vocab_parallel"] and not off["config"]["vocab_parallel"]
    last_on, last_off = on["ranks"][-1]["memory_gib"], off["ranks"][-1]["memory_gib"]
    assert last_on["params_grads"] < last_off["params_grads"]
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    help_text = capsys.readouterr().out
    assert "--vocab-parallel" in help_text and "--no-vocab-parallel" in help_text
