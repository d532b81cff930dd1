"""slimpipe vs torch.distributed.pipelining: same model, weights, tokens and global batch, one run.

Two gloo ranks (fork, FileStore, one thread each) train the same Llama (slimpipe.models, weights from
(seed, global name)) with torch's ``Schedule1F1B`` / ``ScheduleInterleaved1F1B`` /
``ScheduleInterleavedZeroBubble`` and with slimpipe's ``1f1b`` and ``slimpipe`` (several n, v = 1 and 2).
Torch's stages wrap the very same layer modules slimpipe puts on each stage (Megatron's mapping: stage
s = k·p + r holds layers [s·l, (s+1)·l); embedding on stage 0; norm, head and loss on the last). Every step
is a full train step on both sides: forward/backward, global grad norm, clipping, AdamW.

Configurations alternate round-robin over ``--reps`` rounds (the order rotates each round) so machine noise
hits all of them alike; one unrecorded warm-up step per configuration comes first (torch infers shapes on
its first step). Reported per configuration: median and minimum wall step time (barrier to end of the
optimizer step, slowest rank) and their ratios to torch's 1F1B; the CPU seconds each rank's thread spent
inside forward/backward calls (unlike wall time, not inflated by other processes sharing the core); rank
0's peak activation bytes (saved-for-backward tensors, deduplicated by storage, parameters and token ids
excluded — slimpipe's own MemoryTracker on both sides — plus slimpipe's K/V buffers and dK/dV accumulators,
since torch's SDPA saves K/V as ordinary activations); and the first-step loss, equal across
configurations. ``--trace-dir`` writes each configuration's last step as a Chrome trace; ``--equal-flop``
adds slimpipe rows with equal-FLOP (Seq1F1B-balanced) slice lengths.

    python -m bench.vs_torch_pipelining --seq-len 2048 --microbatches 2 --reps 3 --json out.json

torch.distributed.pipelining is imported here and nowhere else in the repository.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.pipelining import (
    PipelineStage, Schedule1F1B, ScheduleInterleaved1F1B, ScheduleInterleavedZeroBubble,
)

from bench.peer_bench_support import (
    BenchOptions, StepStats, Variant, batch, default_variants, options_dict, parse_model, run_ranks,
    summarise, table, write_traces,
)
from slimpipe.config import ConfigError, ModelConfig
from slimpipe.models.base import PlainContext
from slimpipe.runtime import (
    OptimConfig, ParallelState, PipelineRuntime, build_reference, stages_of_rank,
)
from slimpipe.runtime.memory import MemoryTracker
from slimpipe.runtime.optim import build_optimizer, clip_coefficient, scale_grads, squared_norm
from slimpipe.schedule.actions import Kind, parse_action
from slimpipe.schedule.builders import build
from slimpipe.sim.flops import seq1f1b_partition

__all__ = ["compare", "main", "TorchRunner", "SlimpipeRunner"]

TORCH_SCHEDULES = {
    "1f1b": Schedule1F1B,
    "interleaved-1f1b": ScheduleInterleaved1F1B,
    "interleaved-zb": ScheduleInterleavedZeroBubble,
}


class _StageModule(nn.Module):
    """One torch PipelineStage's submodule: the same layer objects slimpipe holds on that stage."""

    def __init__(self, ref: nn.Module, layers: tuple[int, ...], *, first: bool, last: bool) -> None:
        super().__init__()
        self.first, self.last = first, last
        if first:
            self.embed = ref.embed
        self.layers = nn.ModuleList(ref.layers[str(i)] for i in layers)
        if last:
            self.norm, self.head = ref.norm, ref.head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """ids (1, s) on stage 0, else hidden (1, s, h) -> hidden (1, s, h), or logits (1, s, V) last."""
        if self.first:
            x = self.embed(x)
        ctx = PlainContext()  # unsliced causal SDPA, RoPE tables shared by this stage's layers
        for blk in self.layers:
            x = blk(x, ctx)
        return self.head(self.norm(x)) if self.last else x


class _TrackedStage(PipelineStage):
    """PipelineStage that attributes saved tensors to (stage, micro-batch) units and logs its compute.

    A unit's saved tensors count from its forward until its (full or weight) backward ran — the same
    accounting as slimpipe's executor; peaks are sampled after every forward and backward. ``log`` gets
    one (rank, action, start_s, end_s, cpu_s) per call, named like slimpipe's actions (``0F1``, ``2B0``; a
    split backward logs ``I`` and ``W``); cpu_s is the thread's CPU time inside the call."""

    def __init__(self, *args, tracker: MemoryTracker, log: list, rank: int, **kw) -> None:
        super().__init__(*args, **kw)
        self._tracker, self._log, self._rank = tracker, log, rank

    def _timed(self, kind: str, mb: int, fn, *args):
        t0, c0 = time.time(), time.thread_time()
        out = fn(*args)
        cpu = time.thread_time() - c0
        self._log.append((self._rank, f"{self.stage_index}{kind}{mb}", t0, time.time(), cpu))
        return out

    def forward_one_chunk(self, fwd_chunk_id, args, kwargs=None, save_forward_output=True):
        with self._tracker.saving((self.stage_index, fwd_chunk_id, 0)):
            out = self._timed("F", fwd_chunk_id, super().forward_one_chunk, fwd_chunk_id, args, kwargs,
                              save_forward_output)
        self._tracker.sample(0, 0)
        return out

    def backward_one_chunk(self, bwd_chunk_id, loss=None, full_backward=True, last_backward=False):
        kind = "B" if full_backward else "I"
        out = self._timed(kind, bwd_chunk_id, super().backward_one_chunk, bwd_chunk_id, loss, full_backward,
                          last_backward)
        if full_backward:  # a split backward keeps what W needs until backward_weight_one_chunk
            self._tracker.release((self.stage_index, bwd_chunk_id, 0))
        self._tracker.sample(0, 0)
        return out

    def backward_weight_one_chunk(self, bwd_chunk_id, last_backward=False):
        out = self._timed("W", bwd_chunk_id, super().backward_weight_one_chunk, bwd_chunk_id, last_backward)
        self._tracker.release((self.stage_index, bwd_chunk_id, 0))
        self._tracker.sample(0, 0)
        return out


class TorchRunner:
    """One torch.distributed.pipelining configuration on this rank (p = world size)."""

    def __init__(self, variant: Variant, cfg: ModelConfig, opts: BenchOptions, rank: int, p: int) -> None:
        self.rank, self.p, self.m = rank, p, opts.microbatches
        ref = build_reference(cfg, seed=opts.seed)  # whole model, identical weights on every rank
        infos = stages_of_rank(cfg.num_layers, p, variant.v, rank)
        self.modules = [_StageModule(ref, st.layers, first=st.first, last=st.last) for st in infos]
        del ref  # the stages keep only their own layers alive
        params = {id(q): (n, q) for mod in self.modules for n, q in mod.named_parameters()}
        self.params = [q for _, q in params.values()]
        self._param_ptrs = {q.untyped_storage().data_ptr() for q in self.params}
        self._ids_ptr = 0
        self.tracker = MemoryTracker(lambda ptr: ptr in self._param_ptrs or ptr == self._ids_ptr)
        self._log: list[tuple[int, str, float, float, float]] = []
        stages = [
            _TrackedStage(mod, st.stage, p * variant.v, torch.device("cpu"), tracker=self.tracker,
                          log=self._log, rank=rank)
            for mod, st in zip(self.modules, infos)
        ]
        self.has_first, self.has_last = infos[0].first, any(st.last for st in infos)
        cls = TORCH_SCHEDULES[variant.schedule]
        # Loss = Σ CE / (m·s) per micro-batch, grads unscaled: adds up to the global-batch mean, as slimpipe.
        self.schedule = cls(stages[0] if variant.v == 1 else stages, opts.microbatches, loss_fn=self._loss,
                            scale_grads=False)
        self.optim = OptimConfig(lr=opts.lr)
        self.optimizer = build_optimizer(params.values(), self.optim)
        self._normaliser = 1.0

    def _loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        ce = nn.functional.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="sum")
        return ce / self._normaliser

    def step(self, tokens: torch.Tensor) -> StepStats:
        """One train step on tokens (m, s+1): the schedule, global grad norm, clipping, AdamW."""
        ids, labels = tokens[:, :-1], tokens[:, 1:]
        self._normaliser = float(labels.numel())
        self._ids_ptr = tokens.untyped_storage().data_ptr()
        self.tracker.reset()
        self._log.clear()
        for q in self.params:
            q.grad = None
        losses: list[torch.Tensor] = []
        if self.has_first:
            self.schedule.step(ids, target=labels if self.has_last else None, losses=losses)
        else:
            self.schedule.step(target=labels if self.has_last else None, losses=losses)
        loss = torch.zeros((), dtype=torch.float64)
        for x in losses:  # only the last stage's rank holds losses
            loss += x.detach().double()
        dist.all_reduce(loss)
        sq = squared_norm(self.params, torch.device("cpu"))
        dist.all_reduce(sq)
        scale_grads(self.params, clip_coefficient(float(sq) ** 0.5, self.optim.clip))
        self.optimizer.step()
        pk = self.tracker.peaks()
        return _stats(float(loss), self._log, recv_wait_s=float("nan"), peak_activation=pk.saved,
                      peak_saved=pk.saved)


class SlimpipeRunner:
    """One slimpipe configuration on this rank (PipelineRuntime.train_step)."""

    def __init__(self, variant: Variant, cfg: ModelConfig, opts: BenchOptions, state: ParallelState) -> None:
        weights = seq1f1b_partition(cfg, opts.seq_len, variant.n) if variant.equal_flop else None
        sched = build(variant.schedule, p=state.pp, m=opts.microbatches, n=variant.n, v=variant.v,
                      warmup=opts.warmup, slice_weights=weights)
        self.rank = state.pp_rank
        self.rt = PipelineRuntime(cfg, sched, state, seed=opts.seed, optim=OptimConfig(lr=opts.lr))
        self._cpu: list[float] = []
        ex = self.rt.executor
        if hasattr(ex, "_execute"):  # CPU time per action (the runtime's trace holds wall time only)
            ex._execute = functools.partial(self._execute_timed, ex._execute)

    def _execute_timed(self, execute, idx, action) -> None:
        c0 = time.thread_time()
        execute(idx, action)
        self._cpu.append(time.thread_time() - c0)

    def step(self, tokens: torch.Tensor) -> StepStats:
        self._cpu.clear()
        res = self.rt.train_step(tokens)
        cpu = self._cpu if len(self._cpu) == len(res.trace) else [float("nan")] * len(res.trace)
        log = [(e.rank, e.action, e.start_s, e.end_s, c) for e, c in zip(res.trace, cpu)]
        wait = sum(e.end_s - e.start_s for e in res.trace if parse_action(e.action).kind in _RECV)
        return _stats(res.loss, log, recv_wait_s=wait, peak_activation=res.peak_activation_bytes[0],
                      peak_saved=res.peak_saved_bytes[0])


_RECV = (Kind.RECV_F, Kind.RECV_B)


def _stats(loss: float, log: list, **kw) -> StepStats:
    """Sum wall and CPU seconds of forward (F) and backward (B, I, W) calls out of a step's event log."""
    sums = {"F": [0.0, 0.0], "B": [0.0, 0.0]}
    for _, name, start, end, cpu in log:
        kind = parse_action(name.replace("I", "B")).kind  # torch's split input-backward counts as backward
        key = "F" if kind == Kind.F else "B" if kind in (Kind.B, Kind.W) else None
        if key:
            sums[key][0] += end - start
            sums[key][1] += cpu
    return StepStats(loss=loss, fwd_s=sums["F"][0], bwd_s=sums["B"][0], fwd_cpu_s=sums["F"][1],
                     bwd_cpu_s=sums["B"][1], events=tuple(log), **kw)


def _make_runner(variant: Variant, cfg: ModelConfig, opts: BenchOptions, state: ParallelState):
    if variant.impl == "torch":
        return TorchRunner(variant, cfg, opts, state.pp_rank, state.pp)
    return SlimpipeRunner(variant, cfg, opts, state)


def _rank_body(rank: int, world: int, cfg: ModelConfig, opts: BenchOptions, variants: list[Variant]) -> dict:
    """Everything one rank does: build every configuration, warm up, then timed round-robin rounds."""
    state = ParallelState.create(pp=world, timeout_s=opts.timeout_s)
    runners = [_make_runner(v, cfg, opts, state) for v in variants]
    batches = [batch(cfg, opts, k) for k in range(1 + opts.reps * opts.steps)]
    records: dict[str, list[tuple[float, float, StepStats]]] = {v.name: [] for v in variants}
    warm: dict[str, tuple[float, float, StepStats]] = {}

    def timed(i: int, k: int) -> tuple[float, float, StepStats]:
        """(wall s, CPU s of this process incl. gloo threads, stats) of one step."""
        dist.barrier()
        t0, c0 = time.perf_counter(), time.process_time()
        stats = runners[i].step(batches[k])
        return time.perf_counter() - t0, time.process_time() - c0, stats

    for i, v in enumerate(variants):  # warm-up: step 0 on batch 0 (its loss is the sanity check)
        warm[v.name] = timed(i, 0)
    for rep in range(opts.reps):
        order = list(range(len(variants)))
        order = order[rep % len(order):] + order[: rep % len(order)]  # rotate who runs first
        for i in order:
            for s in range(opts.steps):
                records[variants[i].name].append(timed(i, 1 + rep * opts.steps + s))
    return {"warm": warm, "records": records}


def compare(opts: BenchOptions) -> dict:
    """Run the comparison (forks 2 gloo ranks); returns the summary rows plus run metadata."""
    cfg = parse_model(opts.model)
    if cfg.tie_embeddings:
        raise ConfigError(f"--model {opts.model}: tied embeddings are not wired for torch's stages here; "
                          "use an untied model (tie_embeddings=false)")
    variants = default_variants(opts)
    load_before = os.getloadavg()
    t0 = time.time()
    per_rank = run_ranks(_rank_body, 2, cfg, opts, variants, timeout_s=opts.timeout_s)
    rows = summarise(variants, per_rank, opts)
    if opts.trace_dir:
        write_traces(variants, per_rank, opts.trace_dir)
    return {
        "date": time.strftime("%Y-%m-%d %H:%M"), "machine": f"{os.cpu_count()} cores, CPU, gloo, torch "
        f"{torch.__version__}", "load_before": load_before, "load_after": os.getloadavg(),
        "wall_s": time.time() - t0, "model": cfg.to_dict(), "options": options_dict(opts), "rows": rows,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seq-len", type=int, default=2048, help="tokens per sequence (default 2048)")
    ap.add_argument("--microbatches", type=int, default=2, help="m: sequences per step (default 2)")
    ap.add_argument("--model", default="tiny", help="preset, JSON or preset:field=val,... (default tiny)")
    ap.add_argument("--steps", type=int, default=1, help="timed steps per configuration and round (1)")
    ap.add_argument("--reps", type=int, default=3, help="round-robin rounds (default 3)")
    ap.add_argument("--slices", default="2,4,8", help="slimpipe n values (default 2,4,8)")
    ap.add_argument("--only", default="", help="comma-separated configuration names to keep (default all)")
    ap.add_argument("--warmup", default="auto", choices=("auto", "single", "double"),
                    help="slimpipe builders' warm-up (default auto: single for 1f1b, double otherwise)")
    ap.add_argument("--equal-flop", action="store_true",
                    help="also run slimpipe n > 1 with equal-FLOP slices (rows named …-eqflop)")
    ap.add_argument("--json", default="", help="write the result here")
    ap.add_argument("--trace-dir", default="",
                    help="write each configuration's last step as a Chrome trace into this folder")
    a = ap.parse_args(argv)
    try:
        opts = BenchOptions(seq_len=a.seq_len, microbatches=a.microbatches, model=a.model, steps=a.steps,
                            reps=a.reps, slices=tuple(int(x) for x in a.slices.split(",") if x),
                            only=tuple(x for x in a.only.split(",") if x), warmup=a.warmup,
                            trace_dir=a.trace_dir, equal_flop=a.equal_flop)
        result = compare(opts)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(table(result))
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(result, fh, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
