"""Per-slice cost models: how long each F/B of a (stage, slice) takes and how long its p2p transfer takes.

FLOPs per layer and slice are counted in ``slimpipe.sim.flops`` (``layer_flops``).

Backward = 2× forward for GEMMs and 2.5× for attention (flash attention recomputes QKᵀ: 5 matmuls against
2); recomputation adds the recomputed forward work to B (partial+fc1: fc1; full: the whole layer).
Per GPU the work is divided by t·c (TP shards weights, CP shards tokens with balanced zig-zag causal work).
Communication is charged without overlap (a pessimistic, stated simplification): TP+SP 4 collectives per
layer and direction, CP query-out's collectives as the runtime issues them (``_cp_times``), EP all-to-all, vocab-parallel collectives
(their own actions, priced by ``AnalyticCost.vocab_time``);
DP gradient/parameter sync once per step (dense weights over the d·c replicas, experts over their own
expert-data-parallel group). MoE layers (Megatron's dispatchers): with e = 1 and expert-TP = t the tokens are
all-gathered and reduce-scattered around the MLP like a dense one; with e > 1 every GPU sends its k routed
copies of its s/(t·c) tokens through an all-to-all over the e-member expert group (dispatch and combine,
forward and backward), and with expert-TP = t > 1 the MLP's all-gather/reduce-scatter then carries the k
copies (k times the dense volume); with expert-TP = 1 the MLP needs no TP collective. The router is a
(h × E) GEMM on the SP-sharded tokens. Attention context exchange (SlimPipe §8) is not modelled: the
per-slice attention imbalance stays where the schedule puts it.

With a measured profile (``hardware.profile``, from ``slimpipe calibrate``) the compute part of a unit is
built from fitted kernel times instead of ``FLOPs / (peak × efficiency)``: per layer the model's linear
layers (per-shape fits, else the all-shape fit), sliced attention ``a + b·F_prefix + c·F_diagonal`` and the
elementwise ops per token; the embedding and the loss per token; the sum is scaled by the measured
composition factor κ and one per-action overhead is added (docs/calibrate.md). Communication terms are the
same as without a profile; p2p activations use the profile's dtype size. A profile also charges each p2p
message's rank time (``p2p_send_s`` on the sender, ``p2p_recv_s`` on the receiver) to the unit next to it
(the lowering puts a SEND right after the F/B that produced it and a RECV right before the F/B that uses
it; the simulator gives SEND/RECV actions themselves no rank time), and the transfer keeps only the rest
of the one-way latency.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from slimpipe.config import ModelConfig
from slimpipe.schedule.actions import Kind
from slimpipe.sim.documents import slice_pairs
from slimpipe.sim.flops import ATTN_BWD_FACTOR, layer_flops, linear_shapes
from slimpipe.sim.hardware import CostProfile, Hardware, elementwise_width
from slimpipe.sim.workload import Workload

__all__ = ["CostModel", "UniformCost", "AnalyticCost"]


class CostModel(Protocol):
    """What the simulator asks a cost model; all times in seconds (uniform: in units of one forward)."""

    name: str

    def compute_time(self, kind: Kind, stage: int, seq_slice: int) -> float:
        """Duration of F/B/W of any micro-batch of ``stage`` on slice ``seq_slice``."""
        ...

    def transfer_time(self, kind: Kind, stage: int, seq_slice: int) -> float:
        """Latency from a SEND_F/SEND_B of (stage, slice) until the tensor is usable by the receiver."""
        ...

    def step_overhead(self) -> float:
        """Time added once per step after the pipeline drains (data-parallel gradient sync)."""
        ...


@dataclass(frozen=True, slots=True)
class UniformCost:
    """Every F costs 1, every B 2 (W 1), communication is free: the closed-form bubble convention."""

    name: str = "uniform"

    def compute_time(self, kind: Kind, stage: int, seq_slice: int) -> float:
        return 2.0 if kind is Kind.B else 1.0

    def transfer_time(self, kind: Kind, stage: int, seq_slice: int) -> float:
        return 0.0

    def step_overhead(self) -> float:
        return 0.0


def _ring_time(bytes_per_gpu: float, group: int, bw: float, latency: float) -> float:
    """One ring collective moving (group−1)/group of ``bytes_per_gpu`` through each GPU."""
    if group <= 1:
        return 0.0
    return latency * (group - 1) + bytes_per_gpu * (group - 1) / group / bw


class AnalyticCost:
    """FLOP- and bandwidth-based durations for one workload on one GPU type (see the module docstring).

    Durations depend on (kind, stage, slice) only, so the simulator tabulates them once per step.
    """

    name = "analytic"

    def __init__(self, workload: Workload, hardware: Hardware, slice_fractions: Sequence[float]) -> None:
        self.workload, self.hw = workload, hardware
        s = workload.seq_len
        self.tokens = [s * w for w in slice_fractions]  # tokens of each slice of one sequence
        self.prefix = [sum(self.tokens[:j]) for j in range(len(self.tokens))]
        # (prefix, diagonal) query-key pairs per slice: causal (T·P, T²/2), or the expectation over packed
        # rows of the workload's document lengths (document-causal: sim/documents.py)
        self.pairs = slice_pairs(workload.seq_len, slice_fractions, workload.documents)
        par = workload.parallel
        self.b = par.micro_batch  # sequences per micro-batch: every per-unit cost scales with b
        self._fwd: dict[tuple[int, int], float] = {}
        self._bwd: dict[tuple[int, int], float] = {}
        self._span_tp = par.tp
        self._span_cp = par.tp * par.cp
        self._span_pp = 2 * par.tp * par.cp * par.dp  # neighbours sit t·c·d GPU ids apart (pp outermost)

    # -- per-layer pieces -------------------------------------------------------------------------
    def _layer_times(self, j: int) -> tuple[float, float]:
        """(forward, backward) seconds of one layer on slice j, compute and communication."""
        wl, hw, par = self.workload, self.hw, self.workload.parallel
        if hw.profile is not None:
            return self._profiled_layer(hw.profile, j)
        shard = par.tp * par.cp
        fl = layer_flops(wl.model, self.tokens[j], self.prefix[j], pairs=self.pairs[j])
        gemm = hw.peak_flops * hw.gemm_efficiency
        attn = hw.peak_flops * hw.attention_efficiency
        per_gpu = self.b / shard  # b sequences, work split over t·c GPUs
        fwd = per_gpu * (fl.linear / gemm + fl.attention / attn)
        bwd = per_gpu * (2 * fl.linear / gemm + ATTN_BWD_FACTOR * fl.attention / attn)
        rec = wl.recompute
        if rec == "partial+fc1":
            bwd += per_gpu * fl.fc1 / gemm
        elif rec == "full":
            bwd += fwd
        cf, cb = self._comm_times(j)
        return fwd + cf, bwd + cb

    def _profiled_layer(self, prof: CostProfile, j: int) -> tuple[float, float]:
        """(forward, backward) of one layer on slice j from fitted kernel times (module docstring)."""
        wl, par = self.workload, self.workload.parallel
        m, t, c = wl.model, par.tp, par.cp
        tok = self.b * self.tokens[j] / c  # tokens per GPU (CP shards the sequence)
        fwd = bwd = 0.0
        for fin, fout, share in linear_shapes(m, t, par.expert_tp):
            shape = (fin, fout)
            g = prof.gemm(*shape)
            flops = 2 * tok * share * fin * fout
            fwd += g.fwd(flops) if g else prof.gemm_fwd(flops)
            bwd += g.bwd(2 * flops) if g else prof.gemm_bwd(2 * flops)
        q = m.q_dim / t
        for att, acc in ((prof.attn_fwd, 0), (prof.attn_bwd, 1)):
            # CP: each GPU computes 1/c of the slice's query-key pairs (balanced zig-zag).
            pairs = att.at_pairs(q, *self.pairs[j], first=self.prefix[j] <= 0)
            dt = self.b * (pairs - att.fixed_s) / c + att.fixed_s
            fwd, bwd = (fwd + dt, bwd) if acc == 0 else (fwd, bwd + dt)
        width = elementwise_width(m.hidden, m.q_dim, m.kv_dim, m.ffn) / t  # SP/TP shard the elementwise work
        fwd += prof.elementwise_fwd(tok * width)
        bwd += prof.elementwise_bwd(tok * width)
        rec = wl.recompute
        if rec == "full":
            bwd += fwd
        elif rec == "partial+fc1":
            g = prof.gemm(m.hidden, m.ffn // t)
            flops = 2 * tok * m.hidden * m.ffn / t
            bwd += 2 * (g.fwd(flops) if g else prof.gemm_fwd(flops))  # w1 and w3 replayed
        cf, cb = self._comm_times(j)
        # slimpipe's runtime (what a profile describes) saves only the token shard and gathers it again in
        # backward (Megatron's SP), overlapping nothing: one more all-gather per TP region than the 4
        # exposed collectives per direction the presets charge (Megatron overlaps the re-gather).
        attn_tp, mlp_tp, _, _ = self._layer_comm(j)
        return prof.compose(True, fwd) * fwd + cf, prof.compose(False, bwd) * bwd + cb + attn_tp + mlp_tp

    def _profiled_ends(self, prof: CostProfile, j: int, *, head: bool, embed: bool) -> tuple[float, float]:
        """(forward, backward) of the embedding and/or head + loss on slice j from fitted times."""
        wl, par = self.workload, self.workload.parallel
        m = wl.model
        tok = self.b * self.tokens[j] / par.cp
        fwd = bwd = 0.0
        if embed:
            fwd += prof.compose_fwd * prof.embed_fwd(tok * m.hidden / par.tp)
            bwd += prof.compose_bwd * prof.embed_bwd(tok * m.hidden / par.tp)
        if head:
            shard = par.tp * (par.pp if wl.vocab_parallel else 1)
            vocab = m.vocab_size // shard
            g = prof.gemm(m.hidden, vocab)
            flops = 2 * tok * m.hidden * vocab
            if g is None:
                gf, gb = prof.gemm_fwd(flops), prof.gemm_bwd(2 * flops)
            else:
                gf, gb = g.fwd(flops), g.bwd(2 * flops)
            fwd += prof.compose_fwd * (gf + prof.loss_fwd(tok * vocab))
            bwd += prof.compose_bwd * (gb + prof.loss_bwd(tok * vocab))
        return fwd, bwd

    def _comm_times(self, j: int) -> tuple[float, float]:
        """(forward, backward) communication seconds of one layer on slice j: two TP+SP collectives around
        attention and two around the MLP per direction (recompute replays the all-gathers of what it
        recomputes), the CP exchange, the EP all-to-alls."""
        attn_tp, mlp_tp, _, ep = self._layer_comm(j)
        cp_f, cp_b = self._cp_times(j)
        # Full recompute replays the attention, CP collectives included.
        replayed = {"partial+fc1": mlp_tp, "full": attn_tp + mlp_tp + cp_f}.get(self.workload.recompute, 0.0)
        return 2 * (attn_tp + mlp_tp) + cp_f + ep, 2 * (attn_tp + mlp_tp) + replayed + cp_b + ep

    def _cp_times(self, j: int) -> tuple[float, float]:
        """(forward, backward) seconds of query-out's CP collectives in one layer on slice j, as the runtime
        issues them (runtime/cp_attention.py): forward an all-gather of q and an all-to-all of (out, lse),
        backward an all-gather of (q, dout, out, lse) and a reduce-scatter of dq; each moves (c − 1)/c of a
        slice-sized buffer per GPU (lse in fp32 for 16-bit activations). Priced like TP's collectives: the
        profile's calibrated ring when it has one, else the link between CP ranks (t·c GPU ids span)."""
        wl, par, prof = self.workload, self.workload.parallel, self.hw.profile
        c, t = par.cp, par.tp
        if c == 1:
            return 0.0, 0.0
        size = 2 if prof is None else prof.dtype_bytes
        tok = self.tokens[j] * self.b
        q = tok * wl.model.q_dim / t * size  # the gathered queries (= out, dout, dq) of the slice
        lse = tok * wl.model.num_heads / t * max(size, 4)
        ring = functools.partial(self._ring, group=c, span=self._span_cp)
        return ring(q) + ring(q + lse), ring(3 * q + lse) + ring(q)

    def _ring(self, nbytes: float, *, group: int, span: int) -> float:
        """One collective over ``group`` GPUs moving (group − 1)/group of ``nbytes`` through each: the
        profile's calibrated ring (tp_latency_s, tp_bandwidth: gloo/NCCL collectives timed by calibrate)
        when it has one, else the link of that span."""
        hw, prof = self.hw, self.hw.profile
        if prof is not None and prof.tp_bandwidth > 0:
            return _ring_time(nbytes, group, prof.tp_bandwidth, prof.tp_latency_s)
        return _ring_time(nbytes, group, hw.link_bw(span), hw.p2p_latency_s)

    def _tp_ring(self, elements: float, group: int) -> float:
        """One TP ring collective over ``group`` GPUs of ``elements`` per GPU: the profile's calibrated TP
        ring (tp_latency_s, tp_bandwidth) when it has one, else the link; bytes at the profile's dtype
        (bf16 without a profile)."""
        prof = self.hw.profile
        nbytes = elements * (2 if prof is None else prof.dtype_bytes)
        return self._ring(nbytes, group=group, span=self._span_tp)

    def _layer_comm(self, j: int) -> tuple[float, float, float, float]:
        """(one TP+SP collective of attention, one of the MLP, CP forward exchange, EP all-to-all pair)
        seconds for slice j."""
        wl, hw, par = self.workload, self.hw, self.workload.parallel
        model, t, c = wl.model, par.tp, par.cp
        tok = self.tokens[j] * self.b
        lat = hw.p2p_latency_s
        # TP+SP: all-gather before attention and MLP, reduce-scatter after each (backward mirrors them).
        ring = self._tp_ring
        attn_tp = ring(tok / c * model.hidden, t)
        mlp_tp, ep = attn_tp, 0.0
        if model.num_experts > 1:
            etp, e, k = par.expert_tp, par.ep, model.top_k
            # Expert-TP = 1: tokens stay SP-sharded through whole experts; e > 1: the k routed copies.
            volume = 0 if etp == 1 else (k if e > 1 else 1)
            mlp_tp = ring(volume * tok / c * model.hidden, etp)
            if e > 1:  # dispatch + combine all-to-all of the k routed copies of this GPU's tokens
                routed = tok / (t * c) * k * model.hidden * 2
                ep = 2 * (lat + routed * (e - 1) / e / hw.link_bw(etp * e))  # members etp GPU ids apart
        return attn_tp, mlp_tp, self._cp_times(j)[0], ep

    # -- vocabulary layers ------------------------------------------------------------------------
    def _vocab_times(self, j: int) -> tuple[float, float]:
        """(forward, backward) seconds of the output layer for slice j on the last stage (no vocab-parallel:
        with it the work is in the VE/VH/VB collectives, ``vocab_time``)."""
        wl, hw, par = self.workload, self.hw, self.workload.parallel
        tok, h, vsz = self.tokens[j] * self.b, wl.model.hidden, wl.model.vocab_size
        gemm = hw.peak_flops * hw.gemm_efficiency
        # With a profile the head's compute comes from _profiled_ends.
        flops = 0.0 if hw.profile is not None else 2 * tok * h * vsz / (par.tp * par.cp)
        return flops / gemm, 2 * flops / gemm

    def vocab_time(self, kind: Kind, seq_slice: int) -> tuple[float, float]:
        """(per-rank compute, collective communication) seconds of vocabulary collective ``kind`` on slice
        j = ``seq_slice`` over the t·p vocabulary group; the engine runs them in lock-step (schedule/engine.py:
        VE/VB arrive after their compute, VH computes between its collectives, only the ranks that need the
        result wait). Slice j of T_j tokens (b sequences, T_j/c per CP rank), bf16 messages: VE = reduce of
        the (T_j/c, h) embedding (2 ring passes); VH = broadcast of the normalised hidden states (2 passes),
        one all-gather of every shard's (max, Σexp, target) (3 floats per token), the head GEMMs
        ``3 · 2·T_j·h·V/(t·c·p)`` FLOPs (forward, dW, dX) and the reduce of dX (2 passes); VB = broadcast of
        the embedding gradient (2 passes). With a profile the compute parts come from the fitted embedding/
        GEMM/loss times (the head with V/(t·p) rows)."""
        wl, hw, par = self.workload, self.hw, self.workload.parallel
        tok, h = self.tokens[seq_slice] * self.b, wl.model.hidden
        group, bw = par.tp * par.pp, hw.link_bw(self._span_pp * par.pp)
        hidden_pass = _ring_time(tok / par.cp * h * 2, group, bw, hw.p2p_latency_s)  # (T/c, h) bf16, one pass
        prof = hw.profile
        if kind is Kind.VH:
            if prof is not None:
                f, b = self._profiled_ends(prof, seq_slice, head=True, embed=False)
                compute = f + b
            else:
                flops = 3 * 2 * tok * h * wl.model.vocab_size / (par.tp * par.cp * par.pp)
                compute = flops / (hw.peak_flops * hw.gemm_efficiency)
            # all-gather of 3 fp32 per token from every shard
            stats = _ring_time(tok / par.cp * 3 * 4 * group, group, bw, hw.p2p_latency_s)
            return compute, 4 * hidden_pass + stats
        ends = (0.0, 0.0) if prof is None else self._profiled_ends(prof, seq_slice, head=False, embed=True)
        return (ends[0] if kind is Kind.VE else ends[1]), 2 * hidden_pass

    # -- CostModel --------------------------------------------------------------------------------
    def _unit(self, stage: int, j: int) -> tuple[float, float]:
        key = (stage, j)
        if key not in self._fwd:
            wl, par = self.workload, self.workload.parallel
            lf, lb = self._layer_times(j)
            fwd, bwd = wl.layers_per_stage * lf, wl.layers_per_stage * lb
            last_stage = par.pp * par.vpp - 1
            # Vocab-parallel: the embedding and head run in the VE/VH/VB collectives (vocab_time).
            has_head = not wl.vocab_parallel and stage == last_stage
            has_embed = not wl.vocab_parallel and stage == 0
            prof = self.hw.profile
            if prof is not None:
                ef, eb = self._profiled_ends(prof, j, head=has_head, embed=has_embed)
                mf, mb = self._message_times(prof, stage)
                gap = prof.action_gap_s
                fwd, bwd = fwd + ef + prof.action_fwd_s + gap + mf, bwd + eb + prof.action_bwd_s + gap + mb
            if has_head:
                vf, vb = self._vocab_times(j)
                fwd, bwd = fwd + vf, bwd + vb
            self._fwd[key], self._bwd[key] = fwd, bwd
        return self._fwd[key], self._bwd[key]

    def _message_times(self, prof: CostProfile, stage: int) -> tuple[float, float]:
        """(forward, backward) rank time of the p2p messages around a unit of ``stage``: F receives its
        input unless on stage 0 and sends its output unless on the last stage; B the reverse. With p > 1
        neighbouring stages always sit on different ranks (stage s on rank s mod p)."""
        par = self.workload.parallel
        if par.pp == 1:
            return 0.0, 0.0
        first, last = stage == 0, stage == par.pp * par.vpp - 1
        inbound = 0.0 if first else 1.0  # RECV_F before F, SEND_B after B
        outbound = 0.0 if last else 1.0  # SEND_F after F, RECV_B before B
        recv, send = prof.p2p_recv_s + prof.action_gap_s, prof.p2p_send_s + prof.action_gap_s
        return inbound * recv + outbound * send, outbound * recv + inbound * send

    def compute_time(self, kind: Kind, stage: int, seq_slice: int) -> float:
        fwd, bwd = self._unit(stage, seq_slice)
        if kind is Kind.F:
            return fwd
        if kind is Kind.B:
            return bwd
        return bwd / 2  # W: the weight-gradient half of a split backward

    def transfer_time(self, kind: Kind, stage: int, seq_slice: int) -> float:
        par, hw = self.workload.parallel, self.hw
        tokens = self.b * self.tokens[seq_slice] / (par.tp * par.cp)
        size = 2 if hw.profile is None else hw.profile.dtype_bytes  # bf16 unless calibrated otherwise
        nbytes = tokens * self.workload.model.hidden * size  # (b, s_j/(t·c), h)
        latency = hw.p2p_latency_s
        if hw.profile is not None:  # the ranks pay the send and receive overheads (compute_time)
            latency = max(0.0, latency - hw.profile.p2p_send_s - hw.profile.p2p_recv_s)
        return latency + nbytes / hw.link_bw(self._span_pp)

    def step_overhead(self) -> float:
        """Distributed-optimizer sync over the d·c copies: fp32 grad reduce-scatter + bf16 all-gather."""
        from slimpipe.sim.memory import expert_dp, params_on_gpu  # memory owns the parameter layout

        wl, hw, par = self.workload, self.hw, self.workload.parallel
        group, lat = par.dp * par.cp, hw.p2p_latency_s
        split = [params_on_gpu(wl, r) for r in range(par.pp)]
        dense, expert = max(x[0] for x in split), max(x[1] for x in split)
        bw = hw.link_bw(par.tp * group)
        # Expert weights sync over their own expert-data-parallel replicas (Megatron's expert-DP group).
        return _ring_time(dense * 6, group, bw, lat) + _ring_time(expert * 6, round(expert_dp(par)), bw, lat)
