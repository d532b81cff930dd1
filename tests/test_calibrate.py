"""`slimpipe calibrate`: a quick CPU profile, its use by the simulator, and the validation harness."""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
from pathlib import Path

import pytest

from bench import validate_sim  # a script, importable for its core functions
from slimpipe.cli import main
from slimpipe.config import ConfigError, ParallelConfig, load_model
from slimpipe.schedule.actions import Kind
from slimpipe.sim.cost import AnalyticCost
from slimpipe.sim.hardware import (
    AttentionTime, CostProfile, Hardware, LinearTime, load_hardware, load_profile,
)
from slimpipe.sim.workload import Workload


TINY = load_model("tiny")


def _cpu_seconds() -> float:
    import resource

    return sum(resource.getrusage(who).ru_utime + resource.getrusage(who).ru_stime
               for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))


@pytest.fixture(scope="module")
def quick_profile(tmp_path_factory) -> tuple[Path, float]:
    """A --quick CPU profile written by the CLI, and the CPU seconds it took (this process + its children:
    wall time on a shared machine depends on everyone else's load)."""
    path = tmp_path_factory.mktemp("calibrate") / "cpu.json"
    t0 = _cpu_seconds()
    assert main(["calibrate", "--quick", "--threads", "1", "-o", str(path)]) == 0
    return path, _cpu_seconds() - t0


@pytest.mark.timeout(120)
def test_quick_profile_is_valid_and_fast(quick_profile) -> None:
    path, seconds = quick_profile
    assert seconds < 20, f"calibrate --quick took {seconds:.1f} CPU seconds"
    doc = json.loads(path.read_text())
    assert doc["format"] == "slimpipe-profile/1" and doc["meta"]["quick"]
    hw = load_profile(str(path))
    assert hw.name == "cpu" and hw.profile is not None and hw.profile.dtype == "float32"
    assert load_hardware(str(path)) == hw  # --gpu FILE.json takes a profile too
    prof = hw.profile
    assert prof.threads == 1 and prof.device == "cpu" and prof.model == "tiny"
    assert 0 < hw.gemm_efficiency <= 1 and 0 < hw.attention_efficiency <= 1 and hw.peak_flops > 1e8
    # wq/wo (128×128, shared shape), wk/wv, w1/w3, w2, head
    assert len(prof.gemms) == 5 and all(g.fwd.per_item_s > 0 for g in prof.gemms)
    assert prof.attn_fwd.prefix_s + prof.attn_fwd.masked_diagonal_s > 0
    # the P = 0 causal block per measured T (quick grid: T = 64, 128), each point reproduced exactly
    for d, attn in (("fwd", prof.attn_fwd), ("bwd", prof.attn_bwd)):
        assert [t for t, _ in attn.diagonal_curve] == [64.0, 128.0]
        for a in (a for a in doc["measurements"]["attention"] if a["prefix"] == 0):
            assert attn(TINY.q_dim, a["tokens"], 0) == pytest.approx(max(a[f"{d}_s"], attn.fixed_s))
    assert 1e-6 < prof.p2p_latency_s < 0.05 and prof.p2p_bandwidth > 1e7
    assert hw.intra_node_bw == pytest.approx(prof.p2p_bandwidth)  # CPU: the measured gloo link
    # gloo message costs from the 2-rank executor run's traces: a SEND posts a notice (µs…ms); a late
    # RECV waits for the busy sender's progress thread (a rendezvous round trip at least).
    runs = doc["measurements"]["units"]
    late = [x for r in runs for x in r["late_recv_s"]]  # a quick run may see none (then 0: not measured)
    assert 0 < prof.p2p_send_s < 0.05 and prof.p2p_recv_s == (statistics.median(late) if late else 0.0)
    assert [(r["schedule"], r["seq_len"], r["slices"], r["pp"]) for r in runs] == [
        ("slimpipe", 32, 2, 2), ("slimpipe", 256, 2, 2)]
    assert all(r["send_s"] and r["clock"] == "thread CPU, 2-rank executor" for r in runs)
    # CPU time never exceeds the wall time of the same action (medians of the same samples)
    assert all(u["fwd_s"] <= u["fwd_wall_s"] * 1.001 and u["bwd_s"] <= u["bwd_wall_s"] * 1.001
               for r in runs for u in r["units"])
    assert prof.p2p_send_s == statistics.median([x for r in runs for x in r["send_s"]])
    # the executor's own time between actions: a fraction of a millisecond per action
    assert 0 < prof.action_gap_s < 0.01
    assert prof.action_gap_s == statistics.median([x for r in runs for x in r["gap_s"]])
    # The whole fitted model against the executor's own steps (simulator incl. message costs).
    steps = doc["consistency"]["steps"]
    assert [r["what"] for r in steps] == ["slimpipe s=32 n=2 m=2", "slimpipe s=256 n=2 m=2"]
    assert all(r["predicted_s"] > 0 and r["ratio"] == r["predicted_s"] / r["measured_s"] for r in steps)
    # TP collectives (4 forked ranks, T = 2 and 4, all-gather and reduce-scatter), fitted as a ring
    assert {(p["tp"], p["op"]) for p in doc["measurements"]["tp"]} == {
        (t, op) for t in (2, 4) for op in ("all_gather", "reduce_scatter")}
    assert 0 <= prof.tp_latency_s < 0.05 and prof.tp_bandwidth > 1e6
    fp = prof.footprint
    assert fp is not None and fp.kv_per_layer == 2 * TINY.kv_dim * 4
    # fp32 activations of a tiny layer: several KiB per token; the loss stage keeps logits (256 floats).
    assert 4096 < fp.per_layer < 32768 and fp.last_stage >= 4 * TINY.vocab_size


def test_tp_collective_cost_uses_the_fit(quick_profile) -> None:
    """The simulator charges one TP collective as the calibrated ring at the profile's dtype."""
    hw = load_profile(str(quick_profile[0]))
    prof = hw.profile
    wl = Workload(model=TINY, parallel=ParallelConfig(tp=2), seq_len=1024, global_batch=1)
    got = AnalyticCost(wl, hw, (1.0,))._layer_comm(0)[0]
    assert got == pytest.approx(prof.tp_latency_s + 1024 * TINY.hidden * prof.dtype_bytes / 2 / prof.tp_bandwidth)


def test_simulate_accepts_the_profile(quick_profile, capsys) -> None:
    path, _ = quick_profile
    argv = ["simulate", "--model", "tiny", "--seq-len", "1024", "--global-batch", "2", "--pp", "2",
            "--slices", "4"]
    assert main([*argv, "--profile", str(path), "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["config"]["gpu"] == f"profile {path}"
    assert main([*argv, "--json"]) == 0  # same workload on the h800 preset: a CPU is far slower
    preset = json.loads(capsys.readouterr().out)
    assert got["step_time_s"] > 100 * preset["step_time_s"]
    assert main([*argv, "--profile", str(path.with_name("missing.json"))]) == 2
    assert "no such file" in capsys.readouterr().err


def test_profile_reproduces_its_own_unit_times(quick_profile) -> None:
    """The cost model with the profile predicts the runtime F/B times calibrate measured (consistency)."""
    from slimpipe.calibrate import unit_consistency

    path, _ = quick_profile
    doc = json.loads(path.read_text())
    rows = unit_consistency(load_profile(str(path)), doc)
    assert len(rows) == 16  # 2 runs (tiny, s=256) × 2 stages × 2 slices × (F, B)
    ratios = [r["ratio"] for r in rows]
    assert 0.9 <= statistics.median(ratios) <= 1.1, rows
    # Medians of 4 samples (2 steps × 2 micro-batches) on a shared 2-core machine: loose bounds.
    assert all(0.4 <= x <= 2.5 for x in ratios), rows


def test_profiles_without_message_costs_still_load(quick_profile) -> None:
    """Profiles written before the message costs were measured load with both at 0 (the old model)."""
    from slimpipe.sim.hardware import profile_from_dict

    doc = json.loads(quick_profile[0].read_text())
    for key in ("p2p_send_s", "p2p_recv_s"):
        del doc["profile"][key]
    prof = profile_from_dict(doc, default_name="old", source="old.json").profile
    assert prof.p2p_send_s == prof.p2p_recv_s == 0.0


def test_profiles_without_a_diagonal_curve_still_load(quick_profile) -> None:
    """Older profiles have no P = 0 curve: one diagonal coefficient, as before."""
    from slimpipe.sim.hardware import profile_from_dict

    doc = json.loads(quick_profile[0].read_text())
    del doc["profile"]["attn_fwd"]["diagonal_curve"]
    attn = profile_from_dict(doc, default_name="old", source="old.json").profile.attn_fwd
    assert attn.diagonal_curve == ()
    assert attn(64, 100, 0) == pytest.approx(attn.fixed_s + attn.diagonal_s * 2 * 64 * 100 * 100)


def test_diagonal_curve_interpolates_in_log_tokens() -> None:
    attn = AttentionTime(fixed_s=0.0, prefix_s=1.0, diagonal_s=9.0, masked_diagonal_s=5.0,
                         diagonal_curve=((100.0, 4.0), (400.0, 2.0)))
    flops = 2 * 8 * 200 * 200
    assert attn(8, 200, 0) == pytest.approx(3.0 * flops)  # halfway in log T
    assert attn(8, 50, 0) == pytest.approx(4.0 * 2 * 8 * 50 * 50)  # flat beyond the ends
    assert attn(8, 800, 0) == pytest.approx(2.0 * 2 * 8 * 800 * 800)
    assert attn(8, 200, 10) == pytest.approx(4 * 8 * 200 * 10 + 5.0 * flops)  # P > 0: the fitted terms


def test_prefix_curve_prices_a_slice_as_the_runtime_runs_it() -> None:
    """After a prefix: own causal block on the P = 0 curve, plus merge and prefix rate read at T (log T,
    flat beyond the ends); the first slice and curve-less profiles keep the old terms."""
    attn = AttentionTime(fixed_s=1.0, prefix_s=7.0, diagonal_s=9.0, masked_diagonal_s=5.0,
                         diagonal_curve=((100.0, 4.0), (400.0, 2.0)),
                         prefix_curve=((100.0, 10.0, 3.0), (400.0, 30.0, 1.0)))
    q, t, p = 8, 200, 600
    assert attn(q, t, p) == pytest.approx(1.0 + 20.0 + 2.0 * 4 * q * t * p + 3.0 * 2 * q * t * t)
    assert attn(q, 800, p) == pytest.approx(1.0 + 30.0 + 1.0 * 4 * q * 800 * p + 2.0 * 2 * q * 800 * 800)
    assert attn(q, t, 0) == pytest.approx(1.0 + 3.0 * 2 * q * t * t)
    old = dataclasses.replace(attn, prefix_curve=())
    assert old(q, t, p) == pytest.approx(1.0 + 7.0 * 4 * q * t * p + 5.0 * 2 * q * t * t)


def test_prefix_curve_fit_recovers_merge_and_rate() -> None:
    """Per measured T: the P > 0 points less the intercept and the own block, fitted as merge + rate·F."""
    from slimpipe.calibrate.fit import _prefix_curve

    q, fixed, diag = 16, 1e-5, ((64.0, 2e-11), (256.0, 1e-11))
    truth = {64: (0.0, 3e-11), 256: (2e-4, 1.5e-11)}
    pts = [{"tokens": t, "prefix": 0, "fwd_s": fixed + dict(diag)[float(t)] * 2 * q * t * t} for t in truth]
    for t, grid in ((64, (640,)), (256, (768, 1792))):
        for p in grid:
            merge, rate = truth[t]
            own = fixed + dict(diag)[float(t)] * 2 * q * t * t
            pts.append({"tokens": t, "prefix": p, "fwd_s": own + merge + rate * 4 * q * t * p})
    got = _prefix_curve(q, pts, "fwd", fixed, diag)
    assert [k[0] for k in got] == [64.0, 256.0]
    for (t, merge, rate), want in zip(got, truth.values()):
        assert merge == pytest.approx(want[0], abs=1e-9) and rate == pytest.approx(want[1], rel=1e-6)
    assert _prefix_curve(q, pts, "fwd", fixed, ()) == ()  # no P = 0 curve: the old terms


def test_linear_layer_with_noisy_points_takes_the_pooled_line() -> None:
    """A layer whose larger input timed faster (the CI flake: 141 µs at 64 tokens, 52 µs at 256) gets the
    line through all layers' points, not a constant time; a layer with a sound slope keeps its own."""
    from slimpipe.calibrate.fit import _fit_gemms

    def layer(fin, fout, times):
        return {"in_features": fin, "out_features": fout,
                "points": [{"tokens": t, "fwd_s": f, "bwd_s": 2 * f} for t, f in zip((64, 256), times)]}
    good = layer(128, 128, (68e-6, 119e-6))
    noisy, big = layer(128, 64, (141e-6, 52e-6)), layer(128, 384, (67e-6, 257e-6))
    gemms, pooled_f, pooled_b = _fit_gemms([good, noisy, big])
    assert pooled_f.per_item_s > 0 and pooled_b.per_item_s > 0
    assert gemms[1].fwd == pooled_f and gemms[1].bwd == pooled_b
    own = gemms[0].fwd  # through its two points exactly
    assert own != pooled_f and own(2 * 128 * 128 * 256) == pytest.approx(119e-6, rel=1e-9)
    assert all(g.fwd.per_item_s > 0 and g.bwd.per_item_s > 0 for g in gemms)


def test_quick_profile_reproduces_its_prefix_points(quick_profile) -> None:
    """The quick grid has one prefix per T: the curve goes through every measured (T, P > 0) point."""
    doc = json.loads(quick_profile[0].read_text())
    prof = load_profile(str(quick_profile[0])).profile
    for d, attn in (("fwd", prof.attn_fwd), ("bwd", prof.attn_bwd)):
        assert [k[0] for k in attn.prefix_curve] == [64.0, 128.0]
        for a in (a for a in doc["measurements"]["attention"] if a["prefix"] > 0):
            assert attn(TINY.q_dim, a["tokens"], a["prefix"]) == pytest.approx(
                max(a[f"{d}_s"], attn(TINY.q_dim, a["tokens"], 0)))


def test_compose_curve_knots_and_interpolation(quick_profile) -> None:
    """κ per unit size: knots are medians of equal-count groups of units; the profile reads κ in log x,
    flat beyond the ends; without a curve (older profiles, presets) the single factor."""
    from slimpipe.calibrate.fit import _compose_curve
    from slimpipe.sim.hardware import profile_from_dict

    pts = [(x * 1e-3, 2.0 - x / 10) for x in range(1, 10)]  # κ falls with size
    assert _compose_curve(pts, knots=3) == ((2e-3, 1.8), (5e-3, 1.5), (8e-3, 1.2))
    assert _compose_curve(pts[:2]) == ((1.5e-3, 1.85),)  # fewer than 3 points a knot: one knot
    prof = _toy_profile(compose_fwd=9.0, compose_curve_fwd=((1e-3, 2.0), (4e-3, 1.0)))
    assert prof.compose(True, 2e-3) == pytest.approx(1.5)  # halfway in log x
    assert (prof.compose(True, 1e-4), prof.compose(True, 1.0)) == (2.0, 1.0)
    assert prof.compose(False, 2e-3) == prof.compose_bwd  # no backward curve: the factor
    cost = _cost(_toy_profile(gemm_fwd=LinearTime(fixed_s=1e-3, per_item_s=0.0),
                              compose_curve_fwd=((1e-3, 2.0), (1.0, 2.0))), n=1)
    assert cost.compute_time(Kind.F, 0, 0) == pytest.approx(4 * 2.0 * 7e-3)  # 4 layers × κ × 7 GEMMs
    # the quick profile fits one (its two runs give one knot per direction at least); older ones load
    doc = json.loads(quick_profile[0].read_text())
    hw = load_profile(str(quick_profile[0]))
    assert hw.profile.compose_curve_fwd and hw.profile.compose_curve_bwd
    del doc["profile"]["compose_curve_fwd"], doc["profile"]["compose_curve_bwd"]
    old = profile_from_dict(doc, default_name="old", source="old.json").profile
    assert old.compose_curve_fwd == () and old.compose(True, 1e-3) == old.compose_fwd


def test_fastest_pass_keeps_the_quicker_run_and_pools_messages() -> None:
    from slimpipe.calibrate.executor import fastest_pass

    def run(f: float, sends: list[float]) -> dict:
        return {"units": [{"fwd_s": f, "bwd_s": 2 * f}], "send_s": sends, "late_recv_s": [], "step_s": 3 * f}
    a, b = [run(1.0, [0.1]), run(2.0, [0.2])], [run(1.5, [0.3]), run(1.0, [0.4])]
    got = fastest_pass([a, b])
    assert [r["step_s"] for r in got] == [3.0, 3.0]
    assert [r["send_s"] for r in got] == [[0.1, 0.3], [0.2, 0.4]]
    assert got[0]["passes_units_s"] == [3.0, 4.5]


def test_mean_pass_averages_units_and_pools_messages() -> None:
    from slimpipe.calibrate.executor import mean_pass

    def run(f: float, sends: list[float]) -> dict:
        unit = {"stage": 0, "slice": 0, "fwd_s": f, "bwd_s": 2 * f, "fwd_wall_s": f, "bwd_wall_s": 2 * f}
        return {"units": [unit], "send_s": sends, "late_recv_s": [f], "gap_s": [], "step_s": 3 * f}
    got = mean_pass([[run(1.0, [0.1])], [run(2.0, [0.3])]])
    assert got[0]["units"][0]["fwd_s"] == 1.5 and got[0]["units"][0]["bwd_wall_s"] == 3.0
    assert got[0]["step_s"] == 4.5 and got[0]["send_s"] == [0.1, 0.3] and got[0]["late_recv_s"] == [1.0, 2.0]


def test_refit_executor_on_the_profiles_own_runs_is_the_profile(quick_profile) -> None:
    """Refitting the executor terms from the very runs calibrate fitted them from changes nothing; other
    runs move only the executor terms, never the kernels."""
    from slimpipe.calibrate.fit import refit_executor

    doc = json.loads(quick_profile[0].read_text())
    hw = load_profile(str(quick_profile[0]))
    runs = doc["measurements"]["units"]
    assert refit_executor(hw, TINY, runs) == hw
    slow = [{**r, "units": [{**u, "fwd_s": 2 * u["fwd_s"]} for u in r["units"]]} for r in runs]
    got = refit_executor(hw, TINY, slow).profile
    assert got.attn_fwd == hw.profile.attn_fwd and got.gemms == hw.profile.gemms
    was = hw.profile
    assert got.compose(True, 1e-3) > was.compose(True, 1e-3) or got.action_fwd_s > was.action_fwd_s
    assert got.compose_curve_bwd == hw.profile.compose_curve_bwd


def test_unit_consistency_ignores_message_costs(quick_profile) -> None:
    """Unit times are the F/B actions alone (messages are their own actions): no message costs in them."""
    from slimpipe.calibrate import unit_consistency

    doc = json.loads(quick_profile[0].read_text())
    hw = load_profile(str(quick_profile[0]))
    loud = dataclasses.replace(hw, profile=dataclasses.replace(hw.profile, p2p_send_s=1.0, p2p_recv_s=1.0))
    assert unit_consistency(loud, doc) == unit_consistency(hw, doc)


def _toy_profile(**changes) -> CostProfile:
    zero = LinearTime(fixed_s=0.0, per_item_s=0.0)
    attn = AttentionTime(fixed_s=0.0, prefix_s=0.0, diagonal_s=0.0, masked_diagonal_s=0.0)
    base = dict(device="cpu", dtype="float32", dtype_bytes=4, threads=1, model="tiny", model_width=1,
                gemms=(),
                gemm_fwd=zero, gemm_bwd=zero, attn_fwd=attn, attn_bwd=attn, elementwise_fwd=zero,
                elementwise_bwd=zero, embed_fwd=zero, embed_bwd=zero, loss_fwd=zero, loss_bwd=zero,
                compose_fwd=1.0, compose_bwd=1.0, action_fwd_s=0.0, action_bwd_s=0.0, p2p_latency_s=1e-4,
                p2p_bandwidth=1e9)
    return CostProfile(**{**base, **changes})


def _cost(prof: CostProfile, n: int = 4, s: int = 1024) -> AnalyticCost:
    hw = Hardware(name="toy", peak_flops=1e10, hbm_bytes=1e9, intra_node_bw=2e9, inter_node_bw=1e9,
                  p2p_latency_s=5e-4, profile=prof)
    wl = Workload(model=TINY, parallel=ParallelConfig(pp=2, slices=n), seq_len=s, global_batch=2)
    return AnalyticCost(wl, hw, [1 / n] * n)


def test_profiled_cost_composes_the_fitted_terms() -> None:
    """Each fitted term enters exactly as documented: per layer, per slice, κ, per-action overhead."""
    q, l, s, n = TINY.q_dim, 4, 1024, 4
    t = s // n
    attn = AttentionTime(fixed_s=1e-3, prefix_s=2e-10, diagonal_s=1e-10, masked_diagonal_s=3e-10)
    cost = _cost(_toy_profile(attn_fwd=attn, compose_fwd=1.5, action_fwd_s=0.01))
    for j in range(n):
        diag = (1e-10 if j == 0 else 3e-10) * 2 * q * t * t
        want = 0.01 + 1.5 * l * (1e-3 + 2e-10 * 4 * q * t * (j * t) + diag)
        assert cost.compute_time(Kind.F, 0, j) == pytest.approx(want)
        assert cost.compute_time(Kind.B, 0, j) == 0.0
    # Linear layers, the all-shape fit by FLOPs (no per-shape fits here): 2·T·(h(q + 2kv) + qh + 3hf).
    lin = _cost(_toy_profile(gemm_fwd=LinearTime(fixed_s=0.0, per_item_s=1e-9)))
    h, kv, f = TINY.hidden, TINY.kv_dim, TINY.ffn
    flops = 2 * t * (h * (q + 2 * kv) + q * h + 3 * h * f)
    assert lin.compute_time(Kind.F, 0, 0) == pytest.approx(l * flops * 1e-9)
    head = 2 * t * h * TINY.vocab_size * 1e-9  # the last stage also runs the output layer
    assert lin.compute_time(Kind.F, 1, 0) == pytest.approx(l * flops * 1e-9 + head)
    # p2p: latency + fp32 bytes of (T, h) over the link.
    assert cost.transfer_time(Kind.SEND_F, 0, 0) == pytest.approx(5e-4 + t * h * 4 / 2e9)


@pytest.mark.parametrize(("p", "v"), [(2, 1), (2, 2), (4, 1), (1, 2)])
def test_message_costs_are_charged_to_the_adjacent_units(p, v) -> None:
    """A SEND's cost lands on the unit that produced the message, a RECV's on the unit that uses it; the
    transfer keeps the rest of the one-way latency (here none: 0.5 ms < 1 + 2 ms). The executor's gap
    between actions lands on every action: the unit and each message beside it."""
    send, recv, gap = 1e-3, 2e-3, 3e-4
    hw = Hardware(name="toy", peak_flops=1e10, hbm_bytes=1e9, intra_node_bw=2e9, inter_node_bw=1e9,
                  p2p_latency_s=5e-4)
    wl = Workload(model=TINY, parallel=ParallelConfig(pp=p, vpp=v, slices=2), seq_len=256, global_batch=4)
    base = AnalyticCost(wl, dataclasses.replace(hw, profile=_toy_profile()), [0.5, 0.5])
    prof = _toy_profile(p2p_send_s=send, p2p_recv_s=recv, action_gap_s=gap)
    cost = AnalyticCost(wl, dataclasses.replace(hw, profile=prof), [0.5, 0.5])
    last = p * v - 1
    for stage in range(p * v):
        inbound, outbound = (stage > 0 and p > 1), (stage < last and p > 1)
        extra_f = inbound * (recv + gap) + outbound * (send + gap) + gap  # RECV_F before F, SEND_F after it
        extra_b = outbound * (recv + gap) + inbound * (send + gap) + gap  # RECV_B before B, SEND_B after it
        for j in range(2):
            assert cost.compute_time(Kind.F, stage, j) == pytest.approx(base.compute_time(Kind.F, stage, j)
                                                                        + extra_f)
            assert cost.compute_time(Kind.B, stage, j) == pytest.approx(base.compute_time(Kind.B, stage, j)
                                                                        + extra_b)
    bytes_ = 128 * TINY.hidden * 4
    assert base.transfer_time(Kind.SEND_F, 0, 0) == pytest.approx(5e-4 + bytes_ / 2e9)
    assert cost.transfer_time(Kind.SEND_F, 0, 0) == pytest.approx(bytes_ / 2e9)


def test_presets_ignore_profile_machinery() -> None:
    """Without a profile AnalyticCost is the FLOP/efficiency model of the presets, bf16 p2p."""
    from slimpipe.sim.flops import ATTN_BWD_FACTOR, layer_flops

    hw = load_hardware("h800")
    assert hw.profile is None
    model = load_model("llama-7b")
    wl = Workload(model=model, parallel=ParallelConfig(pp=4, slices=1), seq_len=8192, global_batch=8)
    cost = AnalyticCost(wl, hw, [1.0])
    fl, gemm, attn = layer_flops(model, 8192, 0), 989e12 * 0.75, 989e12 * 0.6
    assert cost.compute_time(Kind.F, 1, 0) == pytest.approx(8 * (fl.linear / gemm + fl.attention / attn))
    assert cost.compute_time(Kind.B, 1, 0) == pytest.approx(
        8 * (2 * fl.linear / gemm + ATTN_BWD_FACTOR * fl.attention / attn))
    assert cost.transfer_time(Kind.SEND_F, 0, 0) == pytest.approx(10e-6 + 8192 * 4096 * 2 / 160e9)


def test_load_profile_errors(tmp_path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        load_profile(str(tmp_path / "none.json"))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"peak_flops": 1.0}))
    with pytest.raises(ConfigError, match="not a slimpipe profile"):
        load_profile(str(bad))
    bad.write_text(json.dumps({"format": "slimpipe-profile/1", "hardware": {}, "profile": {}}))
    with pytest.raises(ConfigError, match="not a valid slimpipe profile"):
        load_hardware(str(bad))


@pytest.fixture
def one_thread():
    """Tiny kernels: one intra-op thread is faster and steadier on a busy 2-core machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize(("name", "n", "v"), [("1f1b", 1, 1), ("slimpipe", 4, 2), ("interleaved-1f1b", 1, 2),
                                              ("seq1f1b", 4, 1), ("slimpipe", 2, 1)])
def test_activation_walk_matches_the_runtime(quick_profile, one_thread, name, n, v) -> None:
    """The runtime-format activation prediction equals the runtime's own accounting (LocalPipelineRuntime)."""
    import torch

    from slimpipe.runtime import LocalPipelineRuntime

    hw = load_profile(str(quick_profile[0]))
    model, s = TINY.replace(num_layers=4), 96
    case = validate_sim.Case(schedule=name, seq_len=s, microbatches=3, slices=n, vpp=v)
    pred = validate_sim.predict(case, model, hw)
    rt = LocalPipelineRuntime(model, pred["schedule"])
    res = rt.forward_backward(torch.randint(0, 256, (3, s + 1), generator=torch.Generator().manual_seed(0)))
    for got, want in zip(pred["act"], res.peak_activation_bytes):
        assert got == pytest.approx(want, rel=0.01)


@pytest.mark.timeout(90)
def test_validate_core_runs_on_two_ranks(quick_profile) -> None:
    hw = load_profile(str(quick_profile[0]))
    t0 = _cpu_seconds()
    from slimpipe.calibrate import GRIDS

    # calibrate's quick executor run repeated around the rows: the rows' executor terms refitted from it
    rerun = (GRIDS["cpu-quick"]["units"], 1)
    rows = validate_sim.validate(validate_sim.QUICK_CASES, TINY.replace(num_layers=4), hw, steps=1,
                                 executor=rerun)
    assert _cpu_seconds() - t0 < 40
    assert [r["case"] for r in rows] == ["1f1b", "slimpipe n=4"]
    for r in rows:
        assert r["measured_step_s"] > 0 and math.isfinite(r["step_ratio"]) and 0 <= r["measured_bubble"] < 1
        assert all(abs(x - 1) < 0.01 for x in r["act_ratio"]), r["act_ratio"]
        # every row has p2p messages: the traces show their SEND times; the plain-profile prediction too
        assert r["measured_send_s"] > 0 and math.isfinite(r["step_ratio_without_messages"])
        assert r["measured_noncompute_s"] > 0 and r["predicted_noncompute_s"] > 0
        assert math.isfinite(r["step_ratio_profile_alone"]) and r["executor_refit"]["compose_curve_fwd"]
    assert rows[1]["measured_act_vs_1f1b"] < 1  # slicing cuts rank 0's activation peak
    # warm-up rounds repeat until the heap stops growing (bench/validate_runs.py): at least one, at most
    # --settle (8); each row carries both ranks' page faults per timed step
    assert all(1 <= r["warm_rounds"] <= 8 and len(r["faults_per_step"]) == 2 for r in rows)
    assert "| 128 | 2 | slimpipe n=4 |" in validate_sim.markdown(rows)
