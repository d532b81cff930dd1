"""Hypothesis property tests on random configurations: simulator and memory-model invariants."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from slimpipe.config import MODEL_PRESETS, ConfigError, ParallelConfig
from slimpipe.schedule.builders import build
from slimpipe.sim import AnalyticCost, UniformCost, Workload, load_hardware, memory_model, simulate
from slimpipe.sim.simulator import DeadlockError

configs = st.fixed_dictionaries({
    "name": st.sampled_from(["1f1b", "interleaved-1f1b", "seq1f1b", "slimpipe", "gpipe"]),
    "p": st.sampled_from([1, 2, 4, 8]),
    "m": st.integers(1, 12),
    "n": st.sampled_from([1, 2, 4, 8, 16]),
    "v": st.sampled_from([1, 2, 4]),
    "t": st.sampled_from([1, 2, 8]),
    "c": st.sampled_from([1, 2]),
    "recompute": st.sampled_from(["none", "partial", "partial+fc1", "full"]),
    "offload": st.sampled_from([0.0, 0.5]),
    "vp": st.booleans(),
})


def _setup(cfg):
    try:
        sched = build(cfg["name"], p=cfg["p"], m=cfg["m"], n=cfg["n"], v=cfg["v"])
        par = ParallelConfig(tp=cfg["t"], cp=cfg["c"], pp=cfg["p"], vpp=cfg["v"], slices=cfg["n"])
        wl = Workload(model=MODEL_PRESETS["llama-13b"], parallel=par, seq_len=16384 * cfg["n"],
                      global_batch=cfg["m"], recompute=cfg["recompute"], offload=cfg["offload"],
                      vocab_parallel=cfg["vp"])
    except ConfigError:
        assume(False)
    return sched, wl


SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])


@SETTINGS
@given(configs)
def test_simulation_invariants(cfg) -> None:
    sched, wl = _setup(cfg)
    p, m, n, v = cfg["p"], cfg["m"], cfg["n"], cfg["v"]
    try:
        uni = simulate(sched, UniformCost())
    except DeadlockError:
        assume(False)  # an invalid builder output; the schedule tests own that
    assert uni.bubble_ratio >= (p - 1) / (m * n * v + p - 1) - 1e-12  # the closed form is a lower bound
    assert all(b == 3 * m * n * v for b in uni.busy)
    ana = simulate(sched, AnalyticCost(wl, load_hardware("h100"), sched.slice_fractions()))
    assert 0 <= ana.bubble_ratio < 1
    assert ana.makespan >= max(ana.busy) > 0
    for r in range(p):  # each rank runs one action at a time, in program order
        ends = [e for _, _, e in ana.compute_events(r)]
        assert ends == sorted(ends)


@SETTINGS
@given(configs)
def test_memory_invariants(cfg) -> None:
    sched, wl = _setup(cfg)
    mem = memory_model(wl, sched)
    assert len(mem) == cfg["p"]
    for mb in mem:
        parts = [mb.params_grads, mb.optimizer, mb.activations, mb.output, mb.recomputed, mb.kv_cache,
                 mb.kv_grad, mb.offloaded]
        assert all(x >= 0 for x in parts)
        assert mb.peak == pytest.approx(sum(parts) - mb.offloaded)
        assert mb.offloaded == pytest.approx(cfg["offload"] / (1 - cfg["offload"]) * mb.activations)
    # Activation never grows towards the last rank for these schedules (rank 0 holds the peak).
    acts = [mb.activations for mb in mem]
    assert acts == sorted(acts, reverse=True)
    # Removing recomputation never lowers the saved activations.
    if cfg["recompute"] != "none":
        none = Workload(model=wl.model, parallel=wl.parallel, seq_len=wl.seq_len,
                        global_batch=wl.global_batch, offload=wl.offload, vocab_parallel=wl.vocab_parallel)
        assert memory_model(none, sched)[0].activations >= mem[0].activations


@SETTINGS
@given(configs)
def test_memory_curve_peaks_at_the_model_peak(cfg) -> None:
    from slimpipe.sim import memory_curve

    sched, wl = _setup(cfg)
    try:
        tl = simulate(sched, AnalyticCost(wl, load_hardware("h800"), sched.slice_fractions()))
    except DeadlockError:
        assume(False)
    for mb in memory_model(wl, sched):
        times, gib = memory_curve(wl, tl, mb)
        assert times == sorted(times)
        assert max(gib) == pytest.approx(mb.peak / 2**30, rel=1e-9)
        fixed = mb.params_grads + mb.optimizer + mb.output + mb.recomputed + mb.kv_grad
        assert gib[0] == pytest.approx(fixed / 2**30) and gib[-1] == pytest.approx(fixed / 2**30)
