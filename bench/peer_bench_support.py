"""Plumbing of bench/vs_torch_pipelining.py that does not touch torch.distributed.pipelining.

Options and configuration lists, the forked gloo launcher (platform §6: fork, FileStore, one thread per
child), the per-configuration summary (medians, ratios to torch's 1F1B, loss agreement) and the text table.
"""

from __future__ import annotations

import dataclasses
import os
import re
import statistics
from collections.abc import Callable
from dataclasses import dataclass

import torch

from slimpipe.config import ConfigError, ModelConfig, load_model
from slimpipe.runtime.forked import run_forked
from slimpipe.trace import write_chrome_trace

__all__ = ["BenchOptions", "Variant", "StepStats", "batch", "default_variants", "parse_model", "run_ranks",
           "summarise", "table", "options_dict", "write_traces", "replay", "REFERENCE", "LOSS_RTOL"]

REFERENCE = "torch-1f1b"
# fp32, identical weights and tokens: configurations differ only in summation order (slices, micro-batch
# reductions), ~1e-7 relative; a wrong K/V carry or loss normaliser is off by ≥ 1e-3.
LOSS_RTOL = 1e-5


@dataclass(frozen=True, kw_only=True, slots=True)
class BenchOptions:
    """What one comparison run does."""

    seq_len: int = 2048
    """s: tokens per sequence."""
    microbatches: int = 2
    """m: sequences (micro-batches) per step; the global batch is m·s tokens."""
    model: str = "tiny"
    """Preset, JSON file, or ``preset:field=value,...``."""
    steps: int = 1
    """Timed steps per configuration per round."""
    reps: int = 3
    """Round-robin rounds."""
    slices: tuple[int, ...] = (2, 4, 8)
    """slimpipe slice counts n (each with v = 1 and v = 2)."""
    only: tuple[str, ...] = ()
    """Keep only these configuration names (empty: all)."""
    seed: int = 0
    """Weights and data seed."""
    lr: float = 3e-4
    """AdamW learning rate (both sides)."""
    warmup: str = "auto"
    """slimpipe builders' warm-up (auto | single | double)."""
    trace_dir: str = ""
    """Write each configuration's last timed step as a Chrome trace here (empty: none)."""
    equal_flop: bool = False
    """Also run every slimpipe n > 1 configuration with equal-FLOP slices (``…-eqflop`` rows: Seq1F1B's
    computation-balanced lengths, sim.flops.seq1f1b_partition, instead of equal lengths)."""
    timeout_s: float = 900.0
    """Process-group timeout."""

    def __post_init__(self) -> None:
        for f in ("seq_len", "microbatches", "steps", "reps"):
            if getattr(self, f) < 1:
                raise ConfigError(f"--{f.replace('_', '-')}={getattr(self, f)} must be ≥ 1")
        if self.seq_len < max(self.slices, default=1):
            raise ConfigError(
                f"--seq-len={self.seq_len} is shorter than n={max(self.slices)} slices: raise it or lower "
                "--slices")


@dataclass(frozen=True, kw_only=True, slots=True)
class Variant:
    """One configuration of the comparison."""

    name: str
    """Row label, e.g. ``torch-1f1b`` or ``slimpipe-n8-v2``."""
    impl: str
    """``torch`` (torch.distributed.pipelining) or ``slimpipe``."""
    schedule: str
    """torch: 1f1b | interleaved-1f1b | interleaved-zb; slimpipe: a builder name."""
    n: int = 1
    """Slices per sequence (slimpipe only)."""
    v: int = 1
    """Stages per rank."""
    equal_flop: bool = False
    """slimpipe: slices of equal forward FLOPs (later slices shorter) instead of equal length."""


@dataclass(frozen=True, kw_only=True, slots=True)
class StepStats:
    """What one rank saw in one step."""

    loss: float
    """Global-batch mean loss."""
    fwd_s: float
    """This rank's seconds in forward calls (slimpipe: F actions; torch: forward_one_chunk)."""
    bwd_s: float
    """This rank's seconds in backward calls (B and W actions / backward_*_one_chunk)."""
    fwd_cpu_s: float
    """CPU seconds of this rank's thread inside forward calls (robust to other processes on the core)."""
    bwd_cpu_s: float
    """CPU seconds of this rank's thread inside backward calls."""
    recv_wait_s: float
    """Seconds this rank spent in RECV actions (slimpipe; nan for torch, whose receives are not timed)."""
    peak_activation: int
    """Pipeline rank 0's peak activation bytes (slimpipe: saved + K/V + dK/dV; torch: saved)."""
    peak_saved: int
    """Pipeline rank 0's peak saved-for-backward bytes alone."""
    events: tuple[tuple[int, str, float, float, float], ...] = ()
    """This rank's (rank, action, start_s, end_s, cpu_s): slimpipe's executed actions, torch's compute
    calls."""


def default_variants(opts: BenchOptions) -> list[Variant]:
    out = [
        Variant(name="torch-1f1b", impl="torch", schedule="1f1b"),
        Variant(name="torch-interleaved-1f1b", impl="torch", schedule="interleaved-1f1b", v=2),
        Variant(name="torch-interleaved-zb", impl="torch", schedule="interleaved-zb", v=2),
        Variant(name="slimpipe-1f1b", impl="slimpipe", schedule="1f1b"),
        Variant(name="slimpipe-interleaved-1f1b", impl="slimpipe", schedule="interleaved-1f1b", v=2),
    ]
    for v in (1, 2):
        out += [Variant(name=f"slimpipe-n{n}-v{v}", impl="slimpipe", schedule="slimpipe", n=n, v=v)
                for n in opts.slices]
        if opts.equal_flop:
            out += [Variant(name=f"slimpipe-n{n}-v{v}-eqflop", impl="slimpipe", schedule="slimpipe", n=n, v=v,
                            equal_flop=True) for n in opts.slices if n > 1]
    if opts.only:
        unknown = sorted(set(opts.only) - {v.name for v in out})
        if unknown:
            names = ", ".join(v.name for v in out)
            raise ConfigError(f"--only {','.join(unknown)}: unknown configuration; choose from {names}")
        out = [v for v in out if v.name in opts.only]
    return out


def batch(cfg: ModelConfig, opts: BenchOptions, k: int) -> torch.Tensor:
    """Token batch of step k (m, s+1): the same for every configuration and rank."""
    gen = torch.Generator().manual_seed(opts.seed * 7919 + k)
    return torch.randint(0, cfg.vocab_size, (opts.microbatches, opts.seq_len + 1), generator=gen)


def parse_model(spec: str) -> ModelConfig:
    """``tiny``, ``cfg.json`` or ``tiny:num_layers=4,hidden=64`` (field types from the preset)."""
    name, _, rest = spec.partition(":")
    base = load_model(name)
    changes: dict[str, object] = {}
    for item in filter(None, rest.split(",")):
        key, eq, val = item.partition("=")
        if not eq or not hasattr(base, key):
            raise ConfigError(f"--model {spec}: {item!r} is not field=value of a ModelConfig field")
        cur = getattr(base, key)
        changes[key] = (val.lower() in ("1", "true", "yes")) if isinstance(cur, bool) else type(cur)(val)
    return base.replace(**changes) if changes else base


def run_ranks(body: Callable, world: int, *args: object, timeout_s: float) -> list[object]:
    """body(rank, world, *args) on ``world`` forked gloo ranks; each rank's return value, by rank."""
    return run_forked(body, world, *args, timeout_s=timeout_s)


def _compute_key(name: str) -> tuple[str, int, int, int] | None:
    """('F' | 'B' | 'W', stage, micro-batch, slice) of a compute event name, None for send/recv."""
    m = re.fullmatch(r"(\d+)([FBIW])(\d+)(?:\.(\d+))?", name)
    if m is None:
        return None
    kind = "B" if m.group(2) == "I" else m.group(2)  # torch's split input-backward is what upstream waits on
    return kind, int(m.group(1)), int(m.group(3)), int(m.group(4) or 0)


def replay(events: list[tuple[int, str, float, float, float]], num_stages: int) -> float:
    """Step time if every compute call took its CPU time and messages were free: the contention-free
    projection of a step measured on a busy machine.

    Each rank runs its compute calls in the recorded order; F of stage s also waits for F of stage s−1 and
    B of stage s for B of stage s+1 (same micro-batch and slice), which is what its RECV waited for.
    """
    per_rank: dict[int, list[tuple[tuple[str, int, int, int], float]]] = {}
    for rank, name, _, _, cpu in sorted(events, key=lambda e: e[2]):
        key = _compute_key(name)
        if key is not None:
            per_rank.setdefault(rank, []).append((key, cpu))
    done: dict[tuple[str, int, int, int], float] = {}
    clock, pos = dict.fromkeys(per_rank, 0.0), dict.fromkeys(per_rank, 0)
    while any(pos[r] < len(acts) for r, acts in per_rank.items()):
        progressed = False
        for r, acts in per_rank.items():
            while pos[r] < len(acts):
                (kind, st, mb, j), cpu = acts[pos[r]]
                dep = ("F", st - 1, mb, j) if kind == "F" and st > 0 else (
                    ("B", st + 1, mb, j) if kind == "B" and st < num_stages - 1 else None)
                if dep is not None and dep not in done:
                    break
                clock[r] = max(clock[r], done.get(dep, 0.0)) + cpu
                done[(kind, st, mb, j)] = clock[r]
                pos[r] += 1
                progressed = True
        if not progressed:
            raise RuntimeError(f"replay is stuck at {[acts[pos[r]][0] for r, acts in per_rank.items()]}")
    return max(clock.values())


def _median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def _row(v: Variant, per_rank: list, opts: BenchOptions) -> dict:
    recs = [pr["records"][v.name] for pr in per_rank]  # per rank: [(wall_s, cpu_s, StepStats)]
    walls = [max(r[i][0] for r in recs) for i in range(len(recs[0]))]  # a step ends with its slowest rank
    warm = per_rank[0]["warm"][v.name][2]
    fwd = [_median([s.fwd_s for _, _, s in r]) for r in recs]
    bwd = [_median([s.bwd_s for _, _, s in r]) for r in recs]
    busy = [f + b for f, b in zip(fwd, bwd)]
    step = _median(walls)
    stages = 2 * v.v  # p = 2
    projected = [replay([e for r in recs for e in r[i][2].events], stages) for i in range(len(recs[0]))]
    return {
        "name": v.name, "impl": v.impl, "schedule": v.schedule, "n": v.n, "v": v.v,
        "warmup": opts.warmup if v.impl == "slimpipe" else "torch",
        "step_s": step, "step_min_s": min(walls), "step_s_all": walls,
        "fwd_s": fwd, "bwd_s": bwd, "busy_s": busy, "cpu_s": [_median([c for _, c, _ in r]) for r in recs],
        "compute_cpu_s": [_median([s.fwd_cpu_s + s.bwd_cpu_s for _, _, s in r]) for r in recs],
        "fwd_cpu_s": [_median([s.fwd_cpu_s for _, _, s in r]) for r in recs],
        "bwd_cpu_s": [_median([s.bwd_cpu_s for _, _, s in r]) for r in recs],
        "idle": 1.0 - sum(busy) / (len(busy) * step), "projected_s": _median(projected),
        "recv_wait_s": [_median([s.recv_wait_s for _, _, s in r]) for r in recs],
        "rank0_peak_activation_bytes": warm.peak_activation, "rank0_peak_saved_bytes": warm.peak_saved,
        "first_loss": warm.loss, "first_step_s": max(pr["warm"][v.name][0] for pr in per_rank),
    }


def summarise(variants: list[Variant], per_rank: list, opts: BenchOptions) -> list[dict]:
    """One row per configuration: medians over timed steps and ratios to torch's 1F1B."""
    rows = [_row(v, per_rank, opts) for v in variants]
    ref = next((r for r in rows if r["name"] == REFERENCE), rows[0])
    for r in rows:
        r["reference"] = ref["name"]
        r["step_ratio"] = r["step_s"] / ref["step_s"]
        r["step_min_ratio"] = r["step_min_s"] / ref["step_min_s"]
        r["memory_ratio"] = r["rank0_peak_activation_bytes"] / ref["rank0_peak_activation_bytes"]
        r["compute_cpu_ratio"] = sum(r["compute_cpu_s"]) / sum(ref["compute_cpu_s"])
        r["projected_ratio"] = r["projected_s"] / ref["projected_s"]
        r["loss_rel_diff"] = abs(r["first_loss"] - ref["first_loss"]) / abs(ref["first_loss"])
        r["loss_ok"] = r["loss_rel_diff"] <= LOSS_RTOL
    return rows


def _pair(xs: list[float]) -> str:
    return "/".join("–" if x != x else f"{x:.2f}" for x in xs)  # x != x: nan (not measured)


def table(result: dict) -> str:
    """Markdown table of a compare() result, headed by what was run where."""
    o, mdl = result["options"], result["model"]
    ref = result["rows"][0]["reference"]
    lines = [
        f"model {mdl['name']} (L={mdl['num_layers']}, h={mdl['hidden']}), s={o['seq_len']}, "
        f"m={o['microbatches']}, p=2, slimpipe warm-up {o['warmup']}; {o['reps']} rounds × {o['steps']} "
        f"step(s); {result['machine']}; load {result['load_before'][0]:.1f} → {result['load_after'][0]:.1f}; "
        f"run {result['wall_s']:.0f} s",
        "",
        f"| configuration | step s median (min) | × {ref} median (min) | compute CPU s r0/r1 | × {ref} "
        f"| projected s | × {ref} | busy wall s r0/r1 | idle | recv wait s r0/r1 | rank-0 peak act MiB "
        f"| × {ref} | first loss |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['name']} | {r['step_s']:.2f} ({r['step_min_s']:.2f}) | {r['step_ratio']:.2f} "
            f"({r['step_min_ratio']:.2f}) | {_pair(r['compute_cpu_s'])} | {r['compute_cpu_ratio']:.2f} | "
            f"{r['projected_s']:.2f} | {r['projected_ratio']:.2f} | "
            f"{_pair(r['busy_s'])} | {r['idle']:.0%} | {_pair(r['recv_wait_s'])} | "
            f"{r['rank0_peak_activation_bytes'] / 2**20:.1f} | {r['memory_ratio']:.2f} | "
            f"{r['first_loss']:.6f}{'' if r['loss_ok'] else ' MISMATCH'} |")
    return "\n".join(lines)


def write_traces(variants: list[Variant], per_rank: list, out_dir: str) -> list[str]:
    """``<out_dir>/<configuration>.json``: the last timed step of both ranks (open in ui.perfetto.dev)."""
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for v in variants:
        events = [(rank, name, start, end, {"cpu_ms": round(cpu * 1e3, 3)}) for pr in per_rank
                  for rank, name, start, end, cpu in pr["records"][v.name][-1][2].events]
        path = os.path.join(out_dir, f"{v.name}.json")
        write_chrome_trace(events, path)
        paths.append(path)
    return paths


def options_dict(opts: BenchOptions) -> dict:
    """The options as plain JSON values."""
    return dataclasses.asdict(opts)
