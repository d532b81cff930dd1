"""`slimpipe plan`: search layouts for a model, sequence length and GPU count; print them ranked."""

from __future__ import annotations

import argparse
import json
import sys
import time

__all__ = ["HELP", "add_arguments", "run", "parse_count"]

HELP = ("find the fastest layouts (t, c, p, d, e, n, v, recompute, offload, vocab-parallel, exchange) that "
        "fit in GPU memory")

_BOTH = {"auto": (False, True), "on": (True,), "off": (False,)}
_SPLIT = {"equal": "eq", "equal-flop": "flop"}
_SUFFIX = {"k": 1 << 10, "ki": 1 << 10, "m": 1 << 20, "mi": 1 << 20}


def parse_count(flag: str, text: str) -> int:
    """A positive integer, optionally with a binary suffix as in the paper: 512K = 524288, 4Mi = 4·2²⁰."""
    from slimpipe.config import ConfigError

    raw = text.strip().lower()
    scale = 1
    for suffix in ("ki", "mi", "k", "m"):
        if raw.endswith(suffix):
            raw, scale = raw[: -len(suffix)], _SUFFIX[suffix]
            break
    if not raw.isdigit() or int(raw) < 1:
        raise ConfigError(f"{flag}={text!r} must be a positive integer (suffixes K/Ki = 1024, M/Mi = 2²⁰)")
    return int(raw) * scale


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from slimpipe.planner import SCHEDULES

    parser.add_argument("--model", default="llama-70b",
                        help="preset or ModelConfig .json (default llama-70b)")
    parser.add_argument("--seq-len", required=True, help="s: tokens per sequence (512K = 524288)")
    parser.add_argument("--gpus", required=True, help="G: GPUs to lay out (t·c·p·d)")
    hw = parser.add_mutually_exclusive_group()
    hw.add_argument("--gpu", default="h800", help="hardware preset (h100, h800, h200, a100) or .json")
    hw.add_argument("--profile", metavar="FILE",
                    help="measured profile from `slimpipe calibrate` (replaces --gpu)")
    parser.add_argument("--schedule", default="all", choices=("all", *SCHEDULES),
                        help="schedule family to search (default all)")
    parser.add_argument("--global-batch-tokens", default=str(4 << 20),
                        help="T: tokens per step, B = T/s sequences (default 4Mi, as in the paper)")
    parser.add_argument("--recompute", default="auto", choices=("auto", "none", "partial+fc1", "full"),
                        help="auto: try none → partial+fc1 → full, keep the cheapest that fits")
    parser.add_argument("--max-offload", type=float, default=0.75,
                        help="largest offload fraction α to try (from 0, 0.5, 0.75; 0 disables offload)")
    parser.add_argument("--vocab-parallel", default="auto", choices=("auto", "on", "off"),
                        help="vocabulary layers sharded over t·p (on), on the end stages (off), or both")
    parser.add_argument("--exchange", default="auto", choices=("auto", "on", "off"),
                        help="attention context exchange (slimpipe with n > 1 and p > 1 only): on keeps only "
                             "plans with it, off only plans without, auto tries both")
    parser.add_argument("--slice-split", default="auto", choices=("auto", "equal", "equal-flop"),
                        help="slimpipe slices: equal token counts, equal-FLOP (long early, short late), or "
                             "auto: both (seq1f1b always uses its equal-FLOP segments)")
    parser.add_argument("--doc-lengths", default=None, metavar="SPEC",
                        help="packed documents of these lengths (N[:W],… or @FILE or stdlib): attention "
                             "priced document-causal, no exchange")
    parser.add_argument("--top", type=int, default=10, help="plans to print (default 10)")
    parser.add_argument("--max-simulations", type=int, default=32,
                        help="cap on full simulations (default 32); the output says how much faster "
                             "any unsimulated candidate could be at most")
    parser.add_argument("--json", action="store_true", help="print a JSON list of plans instead of a table")
    parser.add_argument("--quiet", action="store_true",
                        help="no progress line on stderr (it is only drawn when stderr is a terminal)")


def _request(args: argparse.Namespace):  # -> slimpipe.planner.PlanRequest
    from slimpipe.commands.simulate import _model_alias
    from slimpipe.config import ConfigError, load_model
    from slimpipe.planner import OFFLOAD_LADDER, RECOMPUTE_LADDER, SCHEDULES, PlanRequest
    from slimpipe.sim.documents import parse_doc_lengths

    if not 0 <= args.max_offload < 1:  # false for nan too
        ladder = ", ".join(map(str, OFFLOAD_LADDER))
        raise ConfigError(f"--max-offload={args.max_offload!r} must be in [0, 1): the largest offloaded "
                          f"fraction α to try (the ladder is {ladder}; 0 disables)")
    return PlanRequest(
        model=load_model(_model_alias(args.model)), seq_len=parse_count("--seq-len", args.seq_len),
        gpus=parse_count("--gpus", args.gpus), hardware=_hardware(args),
        schedules=SCHEDULES if args.schedule == "all" else (args.schedule,),
        global_batch_tokens=parse_count("--global-batch-tokens", args.global_batch_tokens),
        top=args.top, max_simulations=args.max_simulations,
        recompute=RECOMPUTE_LADDER if args.recompute == "auto" else (args.recompute,),
        offload=tuple(a for a in OFFLOAD_LADDER if a <= args.max_offload),
        vocab_parallel=_BOTH[args.vocab_parallel],
        exchange=(False,) if args.doc_lengths and args.exchange == "auto" else _BOTH[args.exchange],
        documents=parse_doc_lengths(args.doc_lengths) if args.doc_lengths else None,
        slice_split=("equal", "equal-flop") if args.slice_split == "auto" else (args.slice_split,),
    )


def _hardware(args: argparse.Namespace):  # -> slimpipe.sim.hardware.Hardware
    """--gpu preset/file, or --profile from `slimpipe calibrate` (the loaders `slimpipe simulate` uses)."""
    from slimpipe.sim.hardware import load_hardware, load_profile

    return load_profile(args.profile) if args.profile else load_hardware(args.gpu)


def run(args: argparse.Namespace) -> int:
    from slimpipe.planner import plan

    req = _request(args)
    status = _StatusLine(sys.stderr, enabled=not args.quiet)
    try:
        result = plan(req, progress=status)
    finally:
        status.close()
    if not result.plans:
        raise _infeasible(req, result)
    if args.json:
        sys.stdout.write(json.dumps([p.to_dict() for p in result.plans]) + "\n")
    else:
        sys.stdout.write(_table(args, req, result))
    return 0


class _StatusLine:
    """One self-overwriting progress line on a terminal's stderr, at most 10 redraws a second; silent when
    stderr is piped or redirected (scripts, CI logs) or with --quiet."""

    def __init__(self, stream, *, enabled: bool) -> None:
        self.stream = stream
        self.on = enabled and hasattr(stream, "isatty") and stream.isatty()
        self.t0, self.last = time.perf_counter(), float("-inf")  # the first message is drawn at once
        self.width = 0

    def __call__(self, message: str) -> None:
        now = time.perf_counter()
        if not self.on or now - self.last < 0.1:
            return
        self.last = now
        line = f"plan {now - self.t0:5.1f}s  {message}"[:119]
        self.stream.write("\r" + line.ljust(self.width))
        self.stream.flush()
        self.width = len(line)

    def close(self) -> None:
        if self.on and self.width:
            self.stream.write("\r" + " " * self.width + "\r")
            self.stream.flush()


def _infeasible(req, result):  # -> ConfigError
    from slimpipe.config import ConfigError

    mod = req.model
    where = f"no feasible plan for {mod.name} at s={req.seq_len} (B={req.global_batch}) on {req.gpus} GPUs"
    rej = result.rejected
    if result.layouts == 0 and not rej.get("warm-up") and not rej.get("exchange"):
        return ConfigError(
            f"{where}: no layout G = t·c·p·d with t ≤ 8 dividing the heads "
            f"({mod.num_heads}/{mod.num_kv_heads}), "
            f"p dividing L={mod.num_layers}, c a power of two, d dividing B, s divisible by the slices: "
            "change --gpus (e.g. a power of two) or --seq-len"
        )
    parts = []
    if rej.get("memory"):
        parts.append(f"{rej['memory']} layouts exceed {req.hardware.name}'s "
                     f"{req.hardware.hbm_bytes / 2**30:.1f} GiB even with full recompute and offload "
                     f"(smallest peak {result.smallest_rejected_peak_gib:.1f} GiB)")
    if rej.get("warm-up"):
        parts.append(f"{rej['warm-up']} have too few micro-batches for the warm-up (m = B/d)")
    if rej.get("exchange"):
        parts.append(f"{rej['exchange']} cannot use --exchange on (slimpipe with n > 1 and p > 1 only)")
    for reason in ("offload bandwidth", "schedule"):
        if rej.get(reason):
            parts.append(f"{rej[reason]} rejected by {reason}")
    return ConfigError(f"{where}: " + "; ".join(parts) + ": use more GPUs, a shorter --seq-len, a larger "
                       "--global-batch-tokens or a GPU with more memory")


def _table(args: argparse.Namespace, req, result) -> str:
    hw = req.hardware
    lines = [
        f"{req.model.name}  s={req.seq_len}  B={req.global_batch}  {req.gpus} GPUs  {hw.name} "
        f"({hw.hbm_bytes / 2**30:.1f} GiB)  schedules: {args.schedule}",
        f"searched {result.layouts} layouts; rejected "
        + (", ".join(f"{k} {v}" for k, v in sorted(result.rejected.items())) or "none")
        + f"; {result.candidates} candidates fit (cheapest recompute/offload per layout; "
        f"{result.exchange_candidates} with exchange); simulated {result.simulated} best-first "
        f"({result.simulated_exchange} with exchange) in {result.wall_s:.1f} s",
    ]
    if result.not_simulated:
        gain = result.headroom_unsimulated
        why = (f"--max-simulations {req.max_simulations} reached" if result.capped
               else f"estimate below the top {req.top}")
        lines.append(f"{result.not_simulated} candidates not simulated ({why}): "
                     + ("by the step-time bound none can beat #1" if gain <= 0 else
                        f"by the step-time bound none is more than {100 * gain:.1f} % faster than #1"))
    lines += ["MFU = executed FLOPs (6N + 6·L·H·Q·T: causal attention as run)·tokens/s / (GPUs·peak); dense = "
              "the PaLM/torchtitan 6N + 12·L·H·Q·T convention. xchg: attention context exchange (§8, unclipped); "
              "split: eq = equal slices, flop = equal-FLOP slices.", ""]
    head = (f"{'#':>2} {'schedule':<16} {'t':>2} {'c':>3} {'p':>3} {'d':>3} {'e':>2} {'n':>4} {'v':>3} "
            f"{'m':>4} {'recompute':<11} {'α':>4} {'vocab':<5} {'xchg':<4} {'split':<5} {'tokens/s':>10} {'MFU%':>5} "
            f"{'dense%':>6} {'bubble%':>7} {'peak GiB':>8} {'headroom':>8}")
    lines.append(head)
    for i, p in enumerate(result.plans, 1):
        lines.append(
            f"{i:>2} {p.schedule:<16} {p.tp:>2} {p.cp:>3} {p.pp:>3} {p.dp:>3} {p.ep:>2} {p.slices:>4} "
            f"{p.vpp:>3} {p.microbatches:>4} {p.recompute:<11} {p.offload:>4.2g} "
            f"{_on(p.vocab_parallel):<5} {_on(p.exchange):<4} {_SPLIT[p.slice_split]:<5} {p.tokens_per_s:>10.0f} {100 * p.mfu:>5.1f} "
            f"{100 * p.mfu_dense:>6.1f} {100 * p.bubble_ratio:>7.2f} {p.peak_memory_gib:>8.1f} "
            f"{p.headroom_gib:>8.1f}"
        )
    best = result.plans[0]
    gpu = f"--profile {args.profile}" if args.profile else f"--gpu {args.gpu}"
    lines += ["", f"reproduce #1: slimpipe simulate --model {args.model} --seq-len {req.seq_len} "
              f"--global-batch {req.global_batch} {best.simulate_flags()} --gpus {req.gpus} {gpu}"]
    return "\n".join(lines) + "\n"


def _on(flag: bool) -> str:
    return "on" if flag else "off"
