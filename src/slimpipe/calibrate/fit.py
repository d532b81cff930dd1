"""Fitting the CostProfile fields from calibration measurements, and the profile's self-consistency check."""

from __future__ import annotations

import dataclasses
import os
import statistics
from collections.abc import Sequence
from typing import NamedTuple

import torch

from slimpipe.calibrate.measure import _gemm_shapes
from slimpipe.config import ConfigError, ModelConfig, ParallelConfig
from slimpipe.schedule.actions import Kind
from slimpipe.sim.cost import AnalyticCost
from slimpipe.sim.hardware import (
    HARDWARE_PRESETS, AttentionTime, GemmProfile, Hardware, LinearTime, elementwise_width, log_interp,
)
from slimpipe.sim.workload import Workload

__all__ = ["unit_consistency", "step_consistency", "refit_executor"]


def _nnls(rows: Sequence[Sequence[float]], ts: Sequence[float]) -> list[float]:
    """Least squares of relative error (rows scaled by 1/t) with non-negative coefficients."""
    a = torch.tensor(rows, dtype=torch.float64)
    t = torch.tensor(ts, dtype=torch.float64)
    w = 1.0 / t.clamp_min(1e-12)
    active = list(range(a.size(1)))
    while True:
        sol = torch.linalg.lstsq(a[:, active] * w[:, None], (t * w)[:, None]).solution[:, 0]
        if not active or float(sol.min()) >= 0:
            break
        del active[int(sol.argmin())]  # a negative coefficient is noise: pin it to 0 and refit the rest
    coef = [0.0] * a.size(1)
    for i, c in zip(active, sol.tolist()):
        coef[i] = c
    return coef


def _line(points: Sequence[tuple[float, float]]) -> LinearTime:
    """fixed + per_item·x through (x, t) points."""
    c = _nnls([(1.0, x) for x, _ in points], [t for _, t in points])
    return LinearTime(fixed_s=c[0], per_item_s=c[1])


def _fit_tp(points: Sequence[dict]) -> dict[str, float]:
    """tp_latency_s, tp_bandwidth of the ring ``latency·(T−1) + bytes·(T−1)/T / bandwidth`` through the
    measured all-gathers and reduce-scatters (0, 0 when not measured: the simulator then uses the p2p link)."""
    if not points:
        return {"tp_latency_s": 0.0, "tp_bandwidth": 0.0}
    rows = [((p["tp"] - 1), p["bytes"] * (p["tp"] - 1) / p["tp"]) for p in points]
    lat, per_byte = _nnls(rows, [p["s"] for p in points])
    return {"tp_latency_s": lat, "tp_bandwidth": 1.0 / max(per_byte, 1e-15)}


def _fit_gemms(points: Sequence[dict]) -> tuple[tuple[GemmProfile, ...], LinearTime, LinearTime]:
    """Each linear layer's forward/backward line through its own points, and the line through all of them.
    A layer whose own points give no positive slope (its larger input timed faster: noise, e.g. a quick
    profile's two repetitions on a busy machine) takes the pooled line rather than a constant time."""
    per_layer, all_f, all_b = [], [], []
    for g in points:
        size = 2 * g["in_features"] * g["out_features"]
        pf = [(size * p["tokens"], p["fwd_s"]) for p in g["points"]]
        pb = [(2 * size * p["tokens"], p["bwd_s"]) for p in g["points"]]
        all_f += pf
        all_b += pb
        per_layer.append((g, _line(pf), _line(pb)))
    pooled_f, pooled_b = _line(all_f), _line(all_b)
    gemms = tuple(GemmProfile(in_features=g["in_features"], out_features=g["out_features"],
                              fwd=f if f.per_item_s > 0 else pooled_f,
                              bwd=b if b.per_item_s > 0 else pooled_b) for g, f, b in per_layer)
    return gemms, pooled_f, pooled_b


def _fit_kernels(cfg: ModelConfig, m: dict) -> dict[str, object]:
    """The CostProfile fields fitted from kernel measurements (everything but κ and the action overhead)."""
    gemms, gemm_fwd, gemm_bwd = _fit_gemms(m["gemm"])
    q = cfg.q_dim
    rows = [(1.0, 4 * q * a["tokens"] * a["prefix"], 2 * q * a["tokens"] ** 2 * (a["prefix"] == 0),
             2 * q * a["tokens"] ** 2 * (a["prefix"] > 0)) for a in m["attention"]]
    attn = {}
    for d in ("fwd", "bwd"):
        c = _nnls(rows, [a[f"{d}_s"] for a in m["attention"]])
        diag = _diagonal_curve(q, m["attention"], d, c[0])
        prefix = _prefix_curve(q, m["attention"], d, c[0], diag)
        attn[d] = AttentionTime(fixed_s=c[0], prefix_s=c[1], diagonal_s=c[2], masked_diagonal_s=c[3],
                                diagonal_curve=diag, prefix_curve=prefix)
    width = elementwise_width(cfg.hidden, cfg.q_dim, cfg.kv_dim, cfg.ffn)

    def per_token(points, scale, d):
        return _line([(p["tokens"] * scale, p[f"{d}_s"]) for p in points])
    return dict(
        model_width=width, gemms=gemms, gemm_fwd=gemm_fwd, gemm_bwd=gemm_bwd,
        attn_fwd=attn["fwd"], attn_bwd=attn["bwd"],
        elementwise_fwd=per_token(m["elementwise"], width, "fwd"),
        elementwise_bwd=per_token(m["elementwise"], width, "bwd"),
        embed_fwd=per_token(m["embed"], cfg.hidden, "fwd"),
        embed_bwd=per_token(m["embed"], cfg.hidden, "bwd"),
        loss_fwd=per_token(m["loss"], cfg.vocab_size, "fwd"),
        loss_bwd=per_token(m["loss"], cfg.vocab_size, "bwd"),
    )


def _diagonal_curve(q: int, points: Sequence[dict], d: str, fixed_s: float) -> tuple[tuple[float, float], ...]:
    """Seconds per FLOP of the causal block at each measured T with P = 0 (the intercept taken off):
    the first slice and unsliced units, whose kernel speed changes with T (AttentionTime)."""
    pts = sorted((a["tokens"], a[f"{d}_s"]) for a in points if a["prefix"] == 0)
    return tuple((float(t), max(0.0, s - fixed_s) / (2 * q * t * t)) for t, s in pts)


def _prefix_curve(q: int, points: Sequence[dict], d: str, fixed_s: float,
                  diag: tuple[tuple[float, float], ...]) -> tuple[tuple[float, float, float], ...]:
    """(T, merge seconds, seconds per prefix FLOP) at each measured T with P > 0: what a slice after a
    prefix costs beyond the intercept and its own causal block (the P = 0 kernel at T, read on ``diag``),
    fitted over that T's prefixes as ``merge + rate·4q·T·P`` (one prefix: the rate alone). The kernel's
    speed per prefix FLOP changes with the query length T (AttentionTime)."""
    if not diag:
        return ()
    out = []
    for t in sorted({a["tokens"] for a in points if a["prefix"] > 0}):
        own = fixed_s + log_interp(diag, t) * 2 * q * t * t
        pts = [(4 * q * t * a["prefix"], a[f"{d}_s"] - own)
               for a in points if a["tokens"] == t and a["prefix"] > 0]
        if len(pts) > 1:
            merge, rate = _nnls([(1.0, x) for x, _ in pts], [max(y, 1e-12) for _, y in pts])
        else:
            merge, rate = 0.0, max(0.0, pts[0][1]) / pts[0][0]
        out.append((float(t), merge, rate))
    return tuple(out)


def _fit_messages(runs: Sequence[dict]) -> dict[str, float]:
    """p2p_send_s, p2p_recv_s: median SEND and late-RECV wall times over the 2-rank executor runs' traces
    (executor.py; the bytes themselves move at the link bandwidth, charged in the transfer);
    action_gap_s: the median executor time between actions per action over every step of both ranks;
    0 where nothing was measured (CUDA)."""
    sends = [x for r in runs for x in r.get("send_s", ())]
    late = [x for r in runs for x in r.get("late_recv_s", ())]
    gaps = [x for r in runs for x in r.get("gap_s", ())]
    return {"p2p_send_s": statistics.median(sends) if sends else 0.0,
            "p2p_recv_s": statistics.median(late) if late else 0.0,
            "action_gap_s": statistics.median(gaps) if gaps else 0.0}


def _unit_cost(cfg: ModelConfig, run: dict, hw: Hardware) -> AnalyticCost:
    """The cost model of one runtime run's F/B units alone: its messages are separate actions in the trace
    (CPU) or absent (CUDA's local runtime), so the message costs are left out of the profile here."""
    if hw.profile is not None:
        hw = dataclasses.replace(hw, profile=dataclasses.replace(hw.profile, p2p_send_s=0.0, p2p_recv_s=0.0,
                                                                 action_gap_s=0.0))
    cfg = cfg.replace(num_layers=run.get("layers", cfg.num_layers))
    wl = Workload(model=cfg, parallel=ParallelConfig(pp=run["pp"], slices=run["slices"]),
                  seq_len=run["seq_len"], global_batch=run["microbatches"])
    return AnalyticCost(wl, hw, [1 / run["slices"]] * run["slices"])


def _compose_curve(points: Sequence[tuple[float, float]], knots: int = 6) -> tuple[tuple[float, float], ...]:
    """(x, κ) knots from per-unit points (kernel seconds per layer, κ of that unit): the points sorted by x
    in ``knots`` groups of equal count, each knot the medians of its group (a unit's κ is noisy, its
    neighbours' median is not); ascending and distinct in x."""
    pts = sorted(points)
    k = max(1, min(knots, len(pts) // 3))
    groups = [pts[len(pts) * i // k: len(pts) * (i + 1) // k] for i in range(k)]
    out: list[tuple[float, float]] = []
    for g in groups:
        x, y = statistics.median(p[0] for p in g), statistics.median(p[1] for p in g)
        if not out or x > out[-1][0]:
            out.append((x, y))
    return tuple(out)


class _UnitPoint(NamedTuple):
    """One runtime unit of the executor run against its kernel sum (the kernels-only cost model)."""

    tiny: bool
    """From the first, tiny run (the per-action overhead)."""
    kernels: tuple[float, float]
    """Kernel seconds (F, B) of the unit."""
    measured: tuple[float, float]
    """Measured seconds (F, B)."""
    layers: int
    """Layers per stage of its run."""
    microbatches: int
    """Micro-batches of its run (how many times a step runs the unit)."""


def _unit_points(cfg: ModelConfig, runs: list[dict], hw: Hardware) -> list[_UnitPoint]:
    """Every unit of every executor run, against the cost model of ``hw``."""
    pts = []
    for i, run in enumerate(runs):
        cost = _unit_cost(cfg, run, hw)
        for u in run["units"]:
            kernels = (cost.compute_time(Kind.F, u["stage"], u["slice"]),
                       cost.compute_time(Kind.B, u["stage"], u["slice"]))
            pts.append(_UnitPoint(i == 0, kernels, (u["fwd_s"], u["bwd_s"]), cost.workload.layers_per_stage,
                                  run["microbatches"]))
    return pts


def _fit_composition(cfg: ModelConfig, runs: list[dict], hw: Hardware) -> dict[str, object]:
    """κ, the per-action overhead and the κ curve per direction: measured unit = action + κ · Σ kernels.

    Not one joint least-squares fit, which trades κ against the overhead on a noisy machine: the overhead
    is the median of (unit − κ·kernels) over the tiny units (the first run, a few tokens per slice), κ
    the median of (unit − overhead) / kernels over the other runs; the two are alternated a few times.
    Where the overhead clamps at zero (the micro-benchmarks' fixed costs already exceed the tiny units),
    κ is refitted over all units so the profile still reproduces its own runs. The curve: each other
    unit's (unit − overhead) / kernels against its kernel seconds per layer (the ends spread over the
    layers), grouped into knots (``_compose_curve``): κ falls with the unit's size on a CPU.
    """
    pts = _unit_points(cfg, runs, hw)
    if not all(r["per_action"] for r in runs):  # CUDA: one factor from whole steps, no per-action term
        k = sum(run["step_s"] for run in runs) / sum(p.microbatches * sum(p.kernels) for p in pts)
        return dict(compose_fwd=k, compose_bwd=k, action_fwd_s=0.0, action_bwd_s=0.0)
    out: dict[str, object] = {}
    for i, d in enumerate(("fwd", "bwd")):
        big = [(p.kernels[i], p.measured[i], p.layers) for p in pts if not p.tiny]
        tiny = [(p.kernels[i], p.measured[i]) for p in pts if p.tiny]
        k, over = 1.0, 0.0
        for _ in range(5):  # alternate: o from the tiny units given κ, κ from the others given o
            over = max(0.0, statistics.median(m - k * x for x, m in tiny))
            k = statistics.median((m - over) / x for x, m, _ in big)
        if over == 0.0:  # kernel fixed costs already exceed the tiny units: κ alone must fit every unit
            k = statistics.median(p.measured[i] / p.kernels[i] for p in pts)
        curve = _compose_curve([(x / layers, (m - over) / x) for x, m, layers in big])
        out.update({f"compose_{d}": k, f"action_{d}_s": over, f"compose_curve_{d}": curve})
    return out


def refit_executor(hw: Hardware, cfg: ModelConfig, runs: list[dict]) -> Hardware:
    """``hw`` with the terms calibrate fits from its 2-rank executor run (κ and its curve, the per-action
    overhead, the message costs, the gap between actions) refitted from ``runs`` (``measure_executor``'s
    records, the tiny run first); the kernel terms stay. For measurements that re-time the executor
    beside the runs they predict (bench/validate_sim.py)."""
    prof = hw.profile
    if prof is None:
        raise ConfigError("refit_executor: the hardware has no calibrated profile")
    kernels = dataclasses.replace(prof, compose_fwd=1.0, compose_bwd=1.0, action_fwd_s=0.0, action_bwd_s=0.0,
                                  compose_curve_fwd=(), compose_curve_bwd=())
    fitted = _fit_composition(cfg, runs, dataclasses.replace(hw, profile=kernels))
    return dataclasses.replace(hw, profile=dataclasses.replace(prof, **fitted, **_fit_messages(runs)))


def unit_consistency(hw: Hardware, doc: dict) -> list[dict]:
    """Predicted vs measured runtime times of the profile's own unit runs (per action; CUDA: per step)."""
    cfg = ModelConfig(**doc["meta"]["model_config"])
    rows = []
    for run in doc["measurements"]["units"]:
        cost = _unit_cost(cfg, run, hw)
        tag = f"{run['schedule']} s={run['seq_len']} n={run['slices']}"
        if not run["per_action"]:
            pred = sum(run["microbatches"] * (cost.compute_time(Kind.F, u["stage"], u["slice"])
                                              + cost.compute_time(Kind.B, u["stage"], u["slice"]))
                       for u in run["units"])
            rows.append({"what": f"{tag} step", "measured_s": run["step_s"], "predicted_s": pred})
            continue
        for u in run["units"]:
            for kind, key in ((Kind.F, "fwd_s"), (Kind.B, "bwd_s")):
                rows.append({"what": f"{tag} {u['stage']}{kind.value}.{u['slice']}", "measured_s": u[key],
                             "predicted_s": cost.compute_time(kind, u["stage"], u["slice"])})
    for r in rows:
        r["ratio"] = r["predicted_s"] / r["measured_s"]
    return rows


def step_consistency(hw: Hardware, doc: dict) -> list[dict]:
    """Simulated vs measured step time of the profile's own 2-rank executor runs (CPU; [] on CUDA): the
    whole model (units, overheads, message costs, the schedule's waits) against what the runtime took."""
    from slimpipe.sim.evaluate import evaluate

    cfg = ModelConfig(**doc["meta"]["model_config"])
    rows = []
    for run in doc["measurements"]["units"]:
        if "send_s" not in run:  # local-runtime units (CUDA): no pipeline step to compare
            continue
        wl = Workload(model=cfg.replace(num_layers=run["layers"]), seq_len=run["seq_len"],
                      global_batch=run["microbatches"],
                      parallel=ParallelConfig(pp=run["pp"], slices=run["slices"]))
        pred = evaluate(wl, run["schedule"], hardware=hw).report.pipeline_time_s
        rows.append({"what": f"{run['schedule']} s={run['seq_len']} n={run['slices']} m={run['microbatches']}",
                     "measured_s": run["step_s"], "predicted_s": pred, "ratio": pred / run["step_s"]})
    return rows


def _hardware_fields(cfg: ModelConfig, m: dict, dev: torch.device, links: str) -> dict[str, object]:
    """Measured peak and efficiencies; links measured (CPU) or from a preset (CUDA, see comm.py)."""
    layer_shapes = set(_gemm_shapes(cfg)[:-1])  # without the head
    peak = agg_flops = agg_time = 0.0
    for g in m["gemm"]:
        top = max(g["points"], key=lambda p: p["tokens"])
        flops = 2 * top["tokens"] * g["in_features"] * g["out_features"]
        peak = max(peak, flops / top["fwd_s"])
        if (g["in_features"], g["out_features"]) in layer_shapes:
            agg_flops, agg_time = agg_flops + flops, agg_time + top["fwd_s"]
    big = max(m["attention"], key=lambda a: a["tokens"] * (a["prefix"] + a["tokens"] / 2))
    attn_rate = 4 * cfg.q_dim * big["tokens"] * (big["prefix"] + big["tokens"] / 2) / big["fwd_s"]
    fit = _line([(p["bytes"], p["one_way_s"]) for p in m["p2p"]])
    bw = 1.0 / max(fit.per_item_s, 1e-15)
    out: dict[str, object] = dict(peak_flops=peak, gemm_efficiency=min(1.0, agg_flops / agg_time / peak),
                                  attention_efficiency=max(1e-3, min(1.0, attn_rate / peak)))
    if dev.type == "cpu":
        out.update(hbm_bytes=float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")),
                   gpus_per_node=os.cpu_count() or 1, intra_node_bw=bw, inter_node_bw=bw,
                   p2p_latency_s=fit.fixed_s)
    else:
        preset = HARDWARE_PRESETS[_links_preset(links, torch.cuda.get_device_name(dev))]
        out.update(hbm_bytes=float(torch.cuda.get_device_properties(dev).total_memory),
                   gpus_per_node=preset.gpus_per_node, intra_node_bw=preset.intra_node_bw,
                   inter_node_bw=preset.inter_node_bw, p2p_latency_s=preset.p2p_latency_s)
    return out


def _links_preset(links: str, device_name: str) -> str:
    if links != "auto":
        if links not in HARDWARE_PRESETS:
            raise ConfigError(f"--links {links!r} is unknown: use auto or one of {sorted(HARDWARE_PRESETS)}")
        return links
    name = device_name.lower()
    return next((k for k in ("h800", "h200", "h100", "a100") if k in name), "h100")
