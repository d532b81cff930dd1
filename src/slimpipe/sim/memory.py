"""The published per-GPU memory model (SlimPipe reference §6), with the activation peak read from a schedule.

Every term is in bytes for one GPU of pipeline rank r (bf16 activations, flash attention, SP on):

* **activation** = per-unit bytes × the peak weighted in-flight units of rank r *in the given schedule*
  (F adds a unit, B frees it), where one unit (one micro-batch, one virtual stage, one slice of s·w_j tokens)
  saves ``a · s·w_j/(t·c) · l`` bytes and ``a`` is the per-token, per-layer saving of the recompute mode
  (``none 12h+4d_kv+6f``, ``partial 12h+4d_kv+4f``, ``partial+fc1 8h+4d_kv``, ``full 2h``). This gives
  ``(1 + 2(p−1)/(n·v))·A1`` for SlimPipe's double warm-up and ``(p + (p−1)/v)·A1`` for Megatron's
  interleaved 1F1B without writing either formula down. With offload α the on-GPU part is (1−α)·activation
  and α·activation is reported as ``offloaded`` (K/V inside the activation are treated like the rest;
  only the separate full-recompute K/V cache is never offloaded — an approximation, see docs/simulate.md).
* **kv_cache** (full recompute with n > 1 only): K/V of every in-flight unit persist for later slices,
  ``4·d_kv · s·w_j/(t·c) · l`` per unit, same in-flight profile (n = 1: nothing needs them, they are
  recomputed with the layer).
* **kv_grad** (n > 1): ``l·KVfull·[2(n−1)/n + (v−1)·max(0, n−g)/n]``, ``KVfull = (s/c)·2·(h/t)·2`` bytes
  (expanded heads, as flash attention allocates dK/dV), g = the schedule's group size; with unequal slices
  (w_j) the fractions are the rows they stand for: ``2(1 − w_{n−1}) + (v−1)·Σ_{j<n−g} w_j``.
* **output**: fp32 logits held for the loss. Vocab-parallel: ``s·V·4/(c·t·p)`` on every rank; otherwise
  ``s·V·4/(c·t)`` on the last rank when n > 1 (the official loss runs after the last slice); n = 1
  (Megatron's fused per-micro-batch loss) and Seq1F1B's per-segment loss hold none beyond one slice,
  which the published model does not count.
* **recomputed**: one slice-layer's replayed tensors, ``(s_j/c)·k·6f/t`` (partial+fc1), ``(s_j/c)·k·2f/t``
  (partial), ``(a_none − 2h − 4d_kv)·s_j/(t·c)`` (full), s_j = the largest slice.
* **exchange** (attention context exchange on): request + reply of one layer of the largest exchange the
  rank takes part in (``sim.exchange.exchange_buffers``; evaluate adds it to the schedule's memory).
* **params_grads** 6 B/param (bf16 weight + fp32 main grad), **optimizer** 12 B/param sharded over the d·c
  GPUs holding the same shard. Vocab-parallel: the (tied) vocabulary matrix is sharded over t·p like the
  layers. Otherwise rank 0 holds the embedding and rank p−1 the output layer (V·h each) on top of L/p layers.
  MoE: dense weights over t, expert weights over expert-TP × e (expert-TP defaults to t, as Megatron's
  ``expert_tensor_parallel_size``: with e = 1 the experts are sharded exactly like a dense MLP); expert
  optimizer states over the t·c·d/(expert-TP·e) expert-data-parallel replicas, which makes the optimizer
  12·P/(t·c·p·d) for dense and MoE alike.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

from slimpipe.config import ParallelConfig
from slimpipe.schedule.actions import Kind, Schedule
from slimpipe.sim.workload import Workload

__all__ = [
    "MemoryBreakdown", "memory_model", "activation_bytes_per_token", "peak_inflight", "params_per_gpu",
    "params_on_gpu", "expert_dp", "unit_bytes", "GIB",
]

GIB = float(1 << 30)


@dataclass(frozen=True, kw_only=True, slots=True)
class MemoryBreakdown:
    """Peak memory of one GPU of pipeline rank ``rank``, bytes per component."""

    rank: int
    """Pipeline rank r."""
    params_grads: float
    """bf16 parameters + fp32 main gradients (6 B/param)."""
    optimizer: float
    """fp32 master weights + Adam moments (12 B/param), sharded by the distributed optimizer."""
    activations: float
    """Saved activations of the peak in-flight units that stay on the GPU."""
    output: float
    """fp32 logits held until the loss."""
    recomputed: float
    """Buffers of one slice-layer's recomputation."""
    kv_cache: float
    """K/V kept for later slices when the layer itself is recomputed (full recompute)."""
    kv_grad: float
    """dK/dV buffers for the prefix gradients handed from later slices to earlier ones."""
    offloaded: float
    """Activation bytes moved to host memory (not part of the peak)."""
    peak_inflight: float
    """Peak in-flight units on this rank (weighted by slice length; equal slices count 1 each)."""
    exchange: float = 0.0
    """Attention context exchange buffers: one layer's request + reply of the largest exchange this rank
    takes part in (sim/exchange.py; 0 without the exchange)."""

    @property
    def peak(self) -> float:
        """Plain sum of the on-GPU components (the published model's Peak column)."""
        return (self.params_grads + self.optimizer + self.activations + self.output + self.recomputed
                + self.kv_cache + self.kv_grad + self.exchange)

    def gib(self) -> dict[str, float]:
        """The components in GiB, with ``peak`` first (the JSON ``memory_gib`` object)."""
        out = {"peak": self.peak / GIB}
        for f in fields(self):
            if f.name not in ("rank", "peak_inflight"):
                out[f.name] = getattr(self, f.name) / GIB
        return out


def activation_bytes_per_token(workload: Workload) -> tuple[float, float]:
    """(a, a_none): saved bytes per token per layer in the workload's recompute mode, and with none.

    MoE layers (top-k) save k copies of the MLP tensors, the k dispatched token copies (the experts' input,
    all-gathered over expert-TP: 2h·etp each per sequence-parallel token) and the k expert outputs the
    routing weights multiply (2h each, reduce-scattered back to the token shard first). partial+fc1 and full
    recompute replay the dispatcher, so neither is kept.
    """
    model = workload.model
    h, kv, f = model.hidden, model.kv_dim, model.ffn
    k = model.top_k if model.num_experts > 1 else 1
    etp = workload.parallel.expert_tp
    disp = 2 * h * k * (etp + 1) if model.num_experts > 1 else 0  # copies in (gathered over etp), outputs
    a_none = 12 * h + 4 * kv + 6 * f * k + disp
    a = {
        "none": a_none,
        "partial": 12 * h + 4 * kv + 4 * f * k + disp,
        "partial+fc1": 8 * h + 4 * kv,
        "full": 2 * h,
    }[workload.recompute]
    return float(a), float(a_none)


def unit_bytes(workload: Workload, per_token_layer: float, fraction: float) -> float:
    """Bytes of one unit (one virtual stage, one slice covering ``fraction`` of s) on one GPU."""
    par = workload.parallel
    tokens = par.micro_batch * workload.seq_len * fraction / (par.tp * par.cp)  # per GPU
    return per_token_layer * tokens * workload.layers_per_stage


def peak_inflight(schedule: Schedule) -> list[float]:
    """Per rank: peak Σ (n·w_j) over units forwarded and not yet backwarded, in program order."""
    n = schedule.num_slices
    weights = [n * w for w in schedule.slice_fractions()]
    peaks = []
    for prog in schedule.ranks:
        cur = best = 0.0
        for a in prog:
            if a.kind is Kind.F:
                cur += weights[a.seq_slice]
                if cur > best:
                    best = cur
            elif a.kind is Kind.B:
                cur -= weights[a.seq_slice]
        peaks.append(best)
    return peaks


def _param_split(workload: Workload) -> tuple[float, float, float]:
    """(dense params of one layer, expert params of one layer, vocabulary-layer params incl. final norm)."""
    model = workload.model
    expert = 3 * model.hidden * model.ffn * model.num_experts if model.num_experts > 1 else 0
    dense = model.layer_params() - expert
    vocab = model.vocab_size * model.hidden * (1 if model.tie_embeddings else 2) + model.hidden
    return float(dense), float(expert), float(vocab)


def params_on_gpu(workload: Workload, rank: int) -> tuple[float, float]:
    """(dense, expert) parameter counts held by one GPU of pipeline rank ``rank``."""
    par, model = workload.parallel, workload.model
    dense, expert, vocab = _param_split(workload)
    per_rank_layers = model.num_layers / par.pp
    if workload.vocab_parallel:
        dense_gpu = (model.num_layers * dense + vocab) / (par.tp * par.pp)
    else:
        vh = model.vocab_size * model.hidden
        ends = vh if rank == 0 else 0.0
        if rank == par.pp - 1:
            ends += model.hidden + (vh if (par.pp > 1 or not model.tie_embeddings) else 0.0)
        dense_gpu = (per_rank_layers * dense + ends) / par.tp
    return dense_gpu, per_rank_layers * expert / (par.expert_tp * par.ep)


def params_per_gpu(workload: Workload, rank: int) -> float:
    """Parameters held by one GPU of pipeline rank ``rank`` (dense shard + expert shard)."""
    return sum(params_on_gpu(workload, rank))


def expert_dp(par: ParallelConfig) -> float:
    """Expert-data-parallel size: the GPUs of one stage holding the same expert shard, t·c·d/(etp·e)."""
    return par.tp * par.cp * par.dp / (par.expert_tp * par.ep)


def _output_bytes(workload: Workload, schedule: Schedule, rank: int) -> float:
    par, model, s = workload.parallel, workload.model, workload.seq_len
    per_slice_loss = schedule.name == "seq1f1b"
    held = s * max(schedule.slice_fractions()) if per_slice_loss else s  # tokens whose logits are held
    held *= par.micro_batch
    if workload.vocab_parallel:
        return held * model.vocab_size * 4 / (par.cp * par.tp * par.pp)
    if schedule.num_slices == 1 or per_slice_loss or rank != par.pp - 1:
        return 0.0
    return held * model.vocab_size * 4 / (par.cp * par.tp)


def _recomputed_bytes(workload: Workload, largest: float, a_none: float) -> float:
    par, model = workload.parallel, workload.model
    k = model.top_k if model.num_experts > 1 else 1
    tok = par.micro_batch * workload.seq_len * largest / par.cp  # SP tokens all-gathered over TP
    if workload.recompute == "partial+fc1":
        return tok * k * 6 * model.ffn / par.tp
    if workload.recompute == "partial":
        return tok * k * 2 * model.ffn / par.tp
    if workload.recompute == "full":
        return (a_none - 2 * model.hidden - 4 * model.kv_dim) * tok / par.tp
    return 0.0


def _kv_grad_bytes(workload: Workload, schedule: Schedule) -> float:
    n, v = schedule.num_slices, schedule.virtual_stages
    if n == 1:
        return 0.0
    par, model = workload.parallel, workload.model
    g = schedule.meta.g
    if not isinstance(g, int):
        from slimpipe.schedule.builders import group_size

        g = group_size(schedule.num_ranks, n, v)
    kv_full = par.micro_batch * workload.seq_len / par.cp * 2 * (model.hidden / par.tp) * 2
    # Rows (fractions of s) in the two terms: the prefix before the last slice, twice (handed-down and fresh
    # dK/dV at the second-to-last slice), and the first n − g slices held by each other virtual stage.
    # Equal slices: 2(n−1)/n and (n−g)/n; equal-FLOP slices have long early slices, so both grow.
    w = schedule.slice_fractions()
    return workload.layers_per_stage * kv_full * (2 * (1 - w[-1]) + (v - 1) * sum(w[: max(0, n - g)]))


def memory_model(workload: Workload, schedule: Schedule, *, inflight: Sequence[float] | None = None) -> list[
        MemoryBreakdown]:
    """Per-rank peak memory of ``workload`` run with ``schedule`` (compute-only or lowered)."""
    par = workload.parallel
    if (schedule.num_ranks, schedule.virtual_stages, schedule.num_slices) != (par.pp, par.vpp, par.slices):
        raise ValueError(
            f"schedule (p={schedule.num_ranks}, v={schedule.virtual_stages}, n={schedule.num_slices}) "
            f"does not match the workload (p={par.pp}, v={par.vpp}, n={par.slices})"
        )
    a, a_none = activation_bytes_per_token(workload)
    per_unit = unit_bytes(workload, a, 1.0 / schedule.num_slices)  # one equal-length slice
    per_unit_kv = unit_bytes(workload, 4 * workload.model.kv_dim, 1.0 / schedule.num_slices)
    recomputed = _recomputed_bytes(workload, max(schedule.slice_fractions()), a_none)
    kv_grad = _kv_grad_bytes(workload, schedule)
    peaks = peak_inflight(schedule) if inflight is None else list(inflight)
    alpha = workload.offload
    keeps_kv = workload.recompute == "full" and schedule.num_slices > 1  # later slices need earlier K/V
    out = []
    for r in range(par.pp):
        dense, expert = params_on_gpu(workload, r)
        act = per_unit * peaks[r]
        out.append(MemoryBreakdown(
            rank=r,
            params_grads=6 * (dense + expert),
            optimizer=12 * (dense / (par.cp * par.dp) + expert / expert_dp(par)),
            activations=(1 - alpha) * act,
            output=_output_bytes(workload, schedule, r),
            recomputed=recomputed,
            kv_cache=per_unit_kv * peaks[r] if keeps_kv else 0.0,
            kv_grad=kv_grad,
            offloaded=alpha * act,
            peak_inflight=peaks[r],
        ))
    return out
