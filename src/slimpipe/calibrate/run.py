"""The whole calibration run: options, per-device grids, measuring (possibly in concurrent processes),
fitting, and the profile document."""

from __future__ import annotations

import dataclasses
import os
import statistics
import time
from dataclasses import dataclass

import torch

from slimpipe.calibrate.comm import _measure_p2p, _measure_tp
from slimpipe.calibrate.executor import fastest_pass, measure_executor
from slimpipe.calibrate.fit import (
    _fit_composition, _fit_kernels, _fit_messages, _fit_tp, _hardware_fields, _line, step_consistency,
    unit_consistency,
)
from slimpipe.calibrate.measure import (
    Progress, _Ctx, _gemm_shapes, _itemsize, _measure_attention, _measure_elementwise, _measure_ends,
    _measure_gemms,
)
from slimpipe.calibrate.units import _measure_footprint, _measure_units
from slimpipe.config import ConfigError, ModelConfig
from slimpipe.runtime.forked import run_forked
from slimpipe.runtime.host_memory import retain_freed_host_memory
from slimpipe.sim.hardware import PROFILE_FORMAT, ActivationFootprint, CostProfile, Hardware

__all__ = ["CalibrateOptions", "calibrate", "GRIDS"]


@dataclass(frozen=True, kw_only=True, slots=True)
class CalibrateOptions:
    """What one calibration run measures."""

    device: str = "cpu"
    """``cpu`` or ``cuda``."""
    model: ModelConfig
    """Model whose shapes are measured."""
    threads: int = 0
    """torch intra-op threads on CPU (0: leave torch's default)."""
    quick: bool = False
    """Fewer, smaller shapes and repetitions (tests; ~10 s)."""
    links: str = "auto"
    """CUDA: preset whose NVLink/NIC figures the profile keeps (auto: matched from the device name)."""
    concurrency: int = 1
    """CPU: measure while this many single-threaded processes run the same measurements at once (what each
    pipeline rank sees when all ranks compute; cores, caches and memory bandwidth are shared)."""


# Per device (and --quick): linear-layer token counts, attention (T, P) grid, elementwise and embedding/loss
# token counts, repetitions, p2p sizes, runtime runs (CPU: the 2-rank executor, (schedule, s, n, m), timed
# steps "executor_reps"; CUDA: the local runtime, (schedule, s, n); the first run tiny: the per-action
# overhead), layers of the model in those runs (0: all), and the tokens of the activation-footprint run.
GRIDS: dict[str, dict[str, object]] = {
    "cpu": dict(gemm=(64, 256, 1024), elem=(128, 512, 2048), ends=(128, 512, 2048), reps=5, unit_layers=0,
                p2p=(1 << 10, 1 << 16, 1 << 20, 1 << 23), tp=(1 << 15, 1 << 18, 1 << 21, 1 << 23),
                # up to 4096 tokens unsliced and 512…1024-token slices after 3.5K of prefix (the validation range)
                attn=((64, 0), (64, 960), (256, 0), (256, 768), (256, 1792), (512, 0), (512, 1536), (512, 3584),
                      (1024, 0), (1024, 1024), (1024, 3072), (2048, 0), (4096, 0)),
                units=(("slimpipe", 32, 4, 2), ("1f1b", 512, 1, 4), ("slimpipe", 512, 4, 4),
                       ("slimpipe", 1024, 4, 2), ("slimpipe", 2048, 4, 2), ("slimpipe", 512, 8, 2),
                       ("1f1b", 2048, 1, 2)), executor_reps=4, executor_passes=2,
                foot_tokens=128),
    "cpu-quick": dict(gemm=(64, 256), elem=(64, 256), ends=(64, 256), reps=2, unit_layers=0,
                      p2p=(1 << 10, 1 << 20), tp=(1 << 15, 1 << 20),
                      attn=((64, 0), (64, 192), (128, 0), (128, 384)),
                      units=(("slimpipe", 32, 2, 2), ("slimpipe", 256, 2, 2)), executor_reps=2,
                      foot_tokens=64),
    # CUDA: a vocabulary of 128K makes the loss inputs 12 B × T × V; runtime runs use 4 of the layers (the
    # per-layer work is the same; building and initialising a 16-layer model would cost seconds each).
    "cuda": dict(gemm=(1024, 4096, 16384), elem=(4096, 16384, 65536), ends=(1024, 4096, 8192), reps=5,
                 unit_layers=4, p2p=(1 << 20, 1 << 26, 1 << 28),
                 attn=((2048, 0), (2048, 6144), (2048, 30720), (8192, 0), (8192, 8192), (8192, 24576),
                       (16384, 0), (16384, 16384)),
                 units=(("slimpipe", 64, 2), ("slimpipe", 16384, 4)), foot_tokens=2048),
    "cuda-quick": dict(gemm=(1024, 4096), elem=(4096, 16384), ends=(1024, 4096), reps=3, unit_layers=4,
                       p2p=(1 << 20, 1 << 26),
                       attn=((2048, 0), (2048, 6144), (4096, 0), (4096, 4096)),
                       units=(("slimpipe", 64, 2), ("slimpipe", 8192, 2)),
                       foot_tokens=1024),
}


def _measure_compute(rank: int, cfg: ModelConfig, grid: dict, dev: torch.device, bar: Progress,
                     threads: int) -> tuple[dict, ActivationFootprint]:
    """Everything but p2p; with several concurrent processes only rank 0 drives the progress bar."""
    if threads:
        torch.set_num_threads(threads)
    if dev.type == "cpu":
        retain_freed_host_memory()  # the kernels run with the runtime's malloc settings
    single = dev.type == "cpu" and torch.get_num_threads() == 1
    ctx = _Ctx(dev=dev, dt=torch.float32 if dev.type == "cpu" else torch.bfloat16, reps=int(grid["reps"]),
               clock=time.thread_time if single else time.perf_counter,
               bar=bar if rank == 0 else Progress(1 << 30, stream=open(os.devnull, "w")))
    torch.manual_seed(0)
    m: dict[str, object] = {"clock": "thread CPU time" if single else "wall"}
    m["gemm"] = _measure_gemms(cfg, grid["gemm"], ctx)
    m["attention"] = _measure_attention(cfg, grid["attn"], ctx)
    m["elementwise"] = _measure_elementwise(cfg, grid["elem"], ctx)
    m["embed"], m["loss"] = _measure_ends(cfg, grid["ends"], ctx)
    if dev.type != "cpu":  # CPU: the 2-rank executor run measured them (_measure_all)
        layers = int(grid["unit_layers"]) or cfg.num_layers
        m["units"] = _measure_units(cfg.replace(num_layers=layers), grid["units"], ctx)
    return m, _measure_footprint(cfg, int(grid["foot_tokens"]), ctx)


def _compute_rank(rank: int, world: int, *args: object) -> tuple[dict, ActivationFootprint]:
    """_measure_compute as a body of slimpipe.runtime.forked.run_forked (no process group)."""
    return _measure_compute(rank, *args)


def _check(opts: CalibrateOptions) -> None:
    if opts.device not in ("cpu", "cuda"):
        raise ConfigError(f"--device {opts.device!r} is unknown: use cpu or cuda")
    if opts.concurrency > 1 and opts.device != "cpu":
        raise ConfigError("--concurrency applies to --device cpu only: use --concurrency 1 on cuda")
    if opts.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is visible here; use --device cpu")


def _measure_all(opts: CalibrateOptions, grid: dict, dev: torch.device,
                 progress: Progress | None) -> tuple[dict, ActivationFootprint]:
    """Every measurement, p2p first: forked children start before this process has run parallel kernels."""
    threads_before = torch.get_num_threads()
    if dev.type == "cpu" and opts.threads:
        torch.set_num_threads(opts.threads)
    steps = 4 + len(_gemm_shapes(opts.model)) + len(grid["attn"]) + (1 if dev.type == "cpu" else len(grid["units"]))
    bar = progress or Progress(steps)
    try:
        m: dict[str, object] = {"p2p": _measure_p2p(dev, grid["p2p"], int(grid["reps"]))}
        # TP collectives: gloo on CPU (one GPU cannot form a TP group; CUDA keeps the preset's links)
        m["tp"] = _measure_tp(grid["tp"], 3 * int(grid["reps"])) if "tp" in grid else []
        bar.step("p2p")
        if dev.type == "cpu":  # forked too: before this process runs parallel kernels
            m["units"] = measure_executor(opts.model, grid["units"], int(grid["executor_reps"]))
            bar.step(f"2-rank executor: {len(grid['units'])} schedules")
        if opts.concurrency > 1:
            m_rest, footprint = run_forked(_compute_rank, opts.concurrency, opts.model, grid, dev, bar,
                                           opts.threads or 1, gloo=False, start_method="fork")[0]
        else:
            m_rest, footprint = _measure_compute(0, opts.model, grid, dev, bar, 0)
        if dev.type == "cpu" and opts.concurrency > 1 and int(grid.get("executor_passes", 1)) > 1:
            # a second pass after the kernels (this process has still run none: they ran forked): the
            # units' CPU time once moved by 1.45× for a few seconds at a 1-min load of 1.1 (BENCHMARKS)
            m["units"] = fastest_pass([m["units"], measure_executor(opts.model, grid["units"],
                                                                    int(grid["executor_reps"]))])
        m_rest.update(m)  # the executor's units, not a concurrent process's
        m = m_rest
    finally:
        torch.set_num_threads(threads_before)
        bar.close()
    return m, footprint


def _fit_hardware(opts: CalibrateOptions, m: dict, footprint: ActivationFootprint, dev: torch.device,
                  threads: int) -> Hardware:
    """The measured Hardware with its fitted CostProfile (kernels first, then κ and the overheads)."""
    dt = torch.float32 if dev.type == "cpu" else torch.bfloat16
    cfg = opts.model
    p2p = _line([(p["bytes"], p["one_way_s"]) for p in m["p2p"]])
    prof = dict(device=dev.type, dtype=str(dt).removeprefix("torch."), dtype_bytes=_itemsize(dt),
                threads=threads, model=cfg.name, **_fit_kernels(cfg, m), compose_fwd=1.0, compose_bwd=1.0,
                action_fwd_s=0.0, action_bwd_s=0.0, p2p_latency_s=p2p.fixed_s,
                p2p_bandwidth=1.0 / max(p2p.per_item_s, 1e-15), footprint=footprint,
                **_fit_messages(m["units"] if dev.type == "cpu" else []), **_fit_tp(m.get("tp", [])))
    fields = _hardware_fields(cfg, m, dev, opts.links)
    kernels_only = Hardware(**fields, profile=CostProfile(**prof))
    prof.update(_fit_composition(cfg, m["units"], kernels_only))
    return Hardware(**fields, profile=CostProfile(**prof))


def calibrate(opts: CalibrateOptions, *, progress: Progress | None = None) -> dict:
    """Measure everything and return the profile document (``load_profile``/``load_hardware`` read it)."""
    _check(opts)
    dev = torch.device(opts.device)
    grid = GRIDS[opts.device + ("-quick" if opts.quick else "")]
    threads = opts.threads or (1 if opts.concurrency > 1 else torch.get_num_threads())
    t0, load0 = time.perf_counter(), os.getloadavg()
    m, footprint = _measure_all(opts, grid, dev, progress)
    hw = _fit_hardware(opts, m, footprint, dev, threads)
    doc = {
        "format": PROFILE_FORMAT,
        "hardware": {k: v for k, v in hw.to_dict().items() if k not in ("name", "profile")},
        "profile": dataclasses.asdict(hw.profile),
        "measurements": m,
        "meta": {
            "date": time.strftime("%Y-%m-%d %H:%M:%S"), "device": opts.device,
            "device_name": (torch.cuda.get_device_name(dev) if dev.type == "cuda"
                            else f"{os.cpu_count()}-core CPU"),
            "torch": torch.__version__, "quick": opts.quick, "elapsed_s": time.perf_counter() - t0,
            "concurrency": opts.concurrency, "clock": m["clock"],
            "load_before": load0, "load_after": os.getloadavg(), "model_config": opts.model.to_dict(),
            "p2p_note": ("gloo between two forked processes" if dev.type == "cpu" else
                         "device-to-device copy on one GPU (stand-in: one GPU cannot run a 2-rank NCCL "
                         "pipeline); hardware links come from the matching preset"),
        },
    }
    ratios = sorted(r["ratio"] for r in unit_consistency(hw, doc))
    doc["consistency"] = {"rows": len(ratios), "median_ratio": statistics.median(ratios),
                          "min_ratio": ratios[0], "max_ratio": ratios[-1], "steps": step_consistency(hw, doc)}
    return doc
