"""Mixtral-style mixture-of-experts MLP: softmax router, top-k routing, SwiGLU experts, load balancing.

For the T = b·t tokens of one slice, rows of ``x`` (T, h):

* **route**: ``p = softmax(x·W_rᵀ)`` over the E experts (at least float32); the k largest are chosen and
  their weights renormalised to sum to 1 (Mixtral's softmax over the top-k logits is the same thing);
* **dispatch**: the k routed copies of every token are sorted by expert (stable: token order within an
  expert) and handed to a :class:`Dispatcher`, which runs each copy through its expert — here, or on the
  expert-parallel rank that owns it (all-to-all, runtime/experts.py) — and returns the outputs in order;
* **combine**: ``y = Σ_k w_k · expert_k(x)``, a weighted sum over each token's k copies (no scatter-add, so
  the result does not depend on the order in which copies come back).

Dropless by default. With ``capacity_factor`` an expert keeps at most ⌈factor·k·t/E⌉ of the t tokens of
one sequence's slice (one dispatch: Megatron counts per micro-batch on its rank, here b = 1), the highest
router probabilities first (Megatron's "probs" policy); dropped copies contribute 0. Which copies drop
therefore depends on the slicing n; dropless routing does not.

**Load-balancing loss**, per MoE layer and per sequence of T tokens (Switch Transformer / Mixtral)::

    aux = α · E · Σ_e f_e · P_e,   f_e = c_e / (k·T),   P_e = S_e / T,   S_e = Σ_t p_{t,e}

with c_e the routed copies (before drops) that chose e, added to the loss with the sequence's token share
T/N (N = tokens of the global batch, the cross-entropy's normaliser). f·P is a product of whole-sequence
means, so it is not a sum over slices (Σ_j f^(j)·P^(j) ≠ f·P, an n-dependent objective). But f carries no
gradient (counts), and ∂loss/∂S^(j)_e = α·E·c_e/(k·T·N) needs only the counts of the *whole* sequence,
which are known when slice j's backward runs: SlimPipe backs a micro-batch's slices only after all of them
were forwarded. So each slice records its counts and S^(j) in its sequence's :class:`SequenceRouting` and
attaches that gradient through an identity on its output whose backward reads the completed counts (Megatron's
``MoEAuxLossAutoScaler`` trick, with sequence-complete counts); the runtime adds the value once the step
ends (runtime/routing.py). The loss and every gradient are therefore exactly the unsliced model's, for any
p, n, v, d or e. Without a routing context (the unsliced reference) the layer computes ``aux`` directly
and appends it to ``ctx.shared[AUX_LOSSES]``.

Ties: top-k on exactly equal probabilities could pick different experts in sliced and unsliced runs if the
router GEMM rounds a row differently with a different number of rows; with fp64 and random weights a tie
within rounding is vanishingly unlikely, and the equivalence tests run in fp64.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from slimpipe.models.fused import swiglu

__all__ = [
    "MoEMLP", "ExpertGroup", "Dispatcher", "LocalDispatcher", "ExpertPlacement", "RoutingContext",
    "SequenceRouting", "route", "ROUTING", "AUX_LOSSES", "is_expert_parameter", "grouped_mm_available",
    "aux_loss_total", "scatter_rows",
]

ROUTING = "moe.routing"
"""``ctx.shared`` key of the slice's :class:`RoutingContext` (set by the pipelined runtime)."""
AUX_LOSSES = "moe.aux_losses"
"""``ctx.shared`` key of the list of per-sequence aux losses ``(b,)`` of an unsliced forward."""

_LOW_PRECISION = (torch.bfloat16, torch.float16)


def is_expert_parameter(name: str) -> bool:
    """True for the weights of one expert (``layers.<i>.mlp.experts.<e>.w1.weight``): they are reduced over
    the expert-data-parallel group and live on one expert-parallel rank."""
    return ".mlp.experts." in name


# ---- routing ----------------------------------------------------------------------------------------------
def route(logits: torch.Tensor, top_k: int, capacity_factor: float | None = None, *, rows: int = 1) -> tuple[
        torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """logits (T, E) of ``rows`` sequences' equal slices → probs (T, E), experts (T, k), weights (T, k) summing
    to 1, keep (T, k) or None. A capacity applies per row (one sequence's slice: Megatron's per-micro-batch
    count with b = 1), so a batch of rows drops the same copies as one row at a time."""
    probs = torch.softmax(logits.float() if logits.dtype in _LOW_PRECISION else logits, dim=-1)
    top, experts = probs.topk(top_k, dim=-1)
    weights = top / top.sum(-1, keepdim=True)
    keep = None
    tokens, num_experts = probs.shape
    t = tokens // rows
    if capacity_factor is not None:
        cap = math.ceil(capacity_factor * top_k * t / num_experts)
        if cap < t:  # else nothing can overflow
            chosen = torch.zeros_like(probs, dtype=torch.bool).scatter_(1, experts, True)
            score = probs.detach().masked_fill(~chosen, -1.0).view(rows, t, num_experts)  # routed pairs compete
            kept = torch.zeros_like(score, dtype=torch.bool).scatter_(1, score.topk(cap, dim=1).indices, True)
            keep = (kept.view(tokens, num_experts) & chosen).gather(1, experts)
    return probs, experts, weights, keep


@dataclass(slots=True)
class SequenceRouting:
    """Routing statistics of one (layer, micro-batch) sequence, recorded slice by slice.

    Keyed by the slice's first token, so a recomputed forward overwrites instead of double counting.
    """

    seq_len: int
    """Tokens of the sequence routed here (T; T/c of them per rank under context parallelism)."""
    scale: float
    """∂loss/∂S_e per routed copy of e: α·E/(k·T·N)."""
    counts: dict[int, tuple[int, torch.Tensor]] = field(default_factory=dict)
    """slice start → (tokens, routed copies per expert (b, E), detached)."""
    sums: dict[int, torch.Tensor] = field(default_factory=dict)
    """slice start → Σ_t p_{t,e} over the slice (b, E), detached (for the value)."""

    def record(self, start: int, tokens: int, counts: torch.Tensor, sums: torch.Tensor) -> None:
        self.counts[start] = (tokens, counts)
        self.sums[start] = sums

    def total_counts(self) -> torch.Tensor:
        """c_e over the whole sequence (b, E); raises unless every token was routed."""
        seen = sum(tok for tok, _ in self.counts.values())
        if seen != self.seq_len:
            raise RuntimeError(
                f"load-balancing loss needs the routing of all {self.seq_len} tokens of the sequence, "
                f"{seen} were forwarded: a slice's backward ran before every slice's forward"
            )
        return sum(c for _, c in self.counts.values())  # type: ignore[return-value]

    def value(self) -> torch.Tensor:
        """This sequence's share of the loss: α·E·Σ_e c_e·S_e/(k·T·N) (a 0-dim tensor)."""
        return self.scale * (self.total_counts() * sum(self.sums.values())).sum()


@runtime_checkable
class RoutingContext(Protocol):
    """What a pipelined slice tells its MoE layers (``ctx.shared[ROUTING]``)."""

    start: int
    """Position of the slice's first token among the sequence's tokens routed on this rank."""
    seq_len: int
    """T: tokens of the whole sequence."""
    normaliser: float
    """N: tokens of the global batch (the loss is a sum over tokens divided by N)."""

    def sequence(self, layer: int, scale: float) -> SequenceRouting:
        """The statistics of ``layer`` for this slice's sequence (created by its first slice)."""
        ...

    def reduce_counts(self, counts: torch.Tensor) -> torch.Tensor:
        """The slice's expert counts (b, E) summed over every rank holding tokens of it (context
        parallelism); the identity otherwise."""
        ...


class _BalanceGrad(torch.autograd.Function):
    """Identity on ``out``; backward adds ∂aux/∂S = share·scale·c (whole-sequence counts) to the slice's S
    (share = 1/T under tensor parallelism: every TP rank routes the same tokens, their gradients are
    summed)."""

    @staticmethod
    def forward(ctx, out: torch.Tensor, sums: torch.Tensor, seq: SequenceRouting,  # type: ignore[override]
                share: float) -> torch.Tensor:
        ctx.seq, ctx.share = seq, share
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        seq: SequenceRouting = ctx.seq
        return grad, seq.total_counts() * (seq.scale * ctx.share), None, None


# ---- experts ------------------------------------------------------------------------------------------------
def grouped_mm_available(x: torch.Tensor, *dims: int) -> bool:
    """torch's grouped GEMM applies: CUDA, bf16/fp16, 16-byte aligned rows, and a torch that has it."""
    return (x.is_cuda and x.dtype in _LOW_PRECISION and hasattr(torch, "_grouped_mm")
            and all(d % 8 == 0 for d in dims))


class _Restack:
    """A saved stacked weight, rebuilt from its parameters in backward instead of being kept."""

    __slots__ = ("weights", "size", "stride", "offset")

    def __init__(self, weights: Sequence[torch.Tensor], t: torch.Tensor) -> None:
        self.weights, self.size, self.stride, self.offset = weights, t.size(), t.stride(), t.storage_offset()

    def rebuild(self) -> torch.Tensor:
        with torch.no_grad():
            return torch.stack(list(self.weights)).as_strided(self.size, self.stride, self.offset)


def _grouped_linear(x: torch.Tensor, offs: torch.Tensor, weights: Sequence[torch.Tensor]) -> torch.Tensor:
    """Rows of group g (by cumulative ``offs``) times ``weights[g]ᵀ``: x (M, in) → (M, out), one kernel.

    The stacked (G, out, in) copy is transient: autograd would save it for dX, so a saved-tensor hook
    keeps the parameters instead and restacks them in backward.
    """
    stacked = torch.stack(list(weights))  # (G, out, in)
    ptr = stacked.untyped_storage().data_ptr()

    def pack(t: torch.Tensor) -> object:
        return _Restack(weights, t) if t.untyped_storage().data_ptr() == ptr else t

    def unpack(p: object) -> torch.Tensor:
        return p.rebuild() if isinstance(p, _Restack) else p  # type: ignore[return-value]

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        return torch._grouped_mm(x, stacked.transpose(-2, -1), offs=offs)


class ExpertGroup(nn.ModuleDict):
    """The SwiGLU experts one rank holds, keyed by their global index (``experts.<e>.w1.weight``)."""

    def __init__(self, first: int, count: int, make_expert: Callable[[], nn.Module]) -> None:
        super().__init__({str(first + i): make_expert() for i in range(count)})
        self.first = first
        self.impl = "auto"  # "loop" | "grouped" | "auto": grouped where grouped_mm_available, else a loop

    def forward(self, x: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
        """x (M, h) sorted by local expert, ``counts[i]`` rows each → (M, h)."""
        experts = list(self.values())
        first = experts[0]
        dims = (x.size(1), first.w1.weight.size(0))
        if self.impl == "grouped" or (self.impl == "auto" and grouped_mm_available(x, *dims)):
            offs = torch.tensor(list(counts), device=x.device).cumsum(0).to(torch.int32)
            g1 = _grouped_linear(x, offs, [e.w1.weight for e in experts])  # (M, f)
            g3 = _grouped_linear(x, offs, [e.w3.weight for e in experts])
            return _grouped_linear(swiglu(g1, g3), offs, [e.w2.weight for e in experts])
        outs, off = [], 0
        for expert, c in zip(experts, counts):
            if c:
                outs.append(expert(x[off : off + c]))
            off += c
        # x * 0 keeps an empty result connected to x: the all-to-all behind x must run its backward too.
        return torch.cat(outs) if outs else x * 0


def scatter_rows(rows: torch.Tensor, index: torch.Tensor, size: int) -> torch.Tensor:
    """out (size, …) with ``out[index[i]] = rows[i]`` and zeros elsewhere, as a gather: autograd saves only
    the index (``index_copy`` would also save ``rows``, one more activation of the routed copies)."""
    inverse = torch.full((size,), rows.size(0), dtype=torch.long, device=rows.device)
    inverse[index] = torch.arange(rows.size(0), device=rows.device)
    if index.numel() < size:  # rows missing from index read a zero row appended at position len(rows)
        rows = torch.cat([rows, rows.new_zeros((1, *rows.shape[1:]))])
    return rows.index_select(0, inverse)


class Dispatcher(Protocol):
    """Runs routed token copies through their experts, wherever the experts live."""

    def __call__(self, x: torch.Tensor, counts: torch.Tensor, experts: ExpertGroup) -> torch.Tensor:
        """x (M, h): copies sorted by global expert; counts (E,) copies per expert → outputs (M, h), same
        order. Collective where experts are distributed: every member calls it in the same order."""
        ...


class LocalDispatcher:
    """Every expert is on this rank (e = 1)."""

    def __call__(self, x: torch.Tensor, counts: torch.Tensor, experts: ExpertGroup) -> torch.Tensor:
        return experts(x, counts.tolist())


@dataclass(frozen=True, kw_only=True, slots=True)
class ExpertPlacement:
    """Which experts of every MoE layer this rank holds, and how tokens reach them."""

    rank: int = 0
    """Expert-parallel rank in [0, e): holds experts [rank·E/e, (rank+1)·E/e)."""
    size: int = 1
    """e: expert-parallel size."""
    dispatcher: Dispatcher = field(default_factory=LocalDispatcher)
    """LocalDispatcher for e = 1; the all-to-all dispatcher of runtime/experts.py otherwise."""


class MoEMLP(nn.Module):
    """Router + the rank's experts; ``forward(x (b, t, h), ctx) → (b, t, h)`` (see the module docstring)."""

    def __init__(self, *, layer: int, hidden: int, num_experts: int, top_k: int, aux_loss_coeff: float,
                 capacity_factor: float | None, make_expert: Callable[[], nn.Module],
                 placement: ExpertPlacement | None = None) -> None:
        super().__init__()
        placement = placement or ExpertPlacement()
        if num_experts % placement.size:
            raise ValueError(f"num_experts={num_experts} is not divisible by the expert-parallel size "
                             f"{placement.size}: pick an --ep dividing it")
        per = num_experts // placement.size
        self.layer, self.num_experts, self.top_k = layer, num_experts, top_k
        self.coeff, self.capacity_factor, self.dispatcher = aux_loss_coeff, capacity_factor, placement.dispatcher
        self.router = nn.Linear(hidden, num_experts, bias=False)
        self.experts = ExpertGroup(placement.rank * per, per, make_expert)
        # Tensor-parallel seams (models/llama_parallel.py): the router runs on the sequence-parallel token
        # shard and its logits are all-gathered, the tokens too; every TP rank sends all of them through its
        # 1/T of each expert, and the partial expert outputs are reduce-scattered back to the token shard
        # before the combine.
        self.gather: Callable[[torch.Tensor], torch.Tensor] = _same
        self.scatter: Callable[[torch.Tensor], torch.Tensor] = _same
        self.tp_rank, self.tp_size = 0, 1

    def forward(self, x: torch.Tensor, ctx: object) -> torch.Tensor:
        """x (b, t/T, h) → (b, t/T, h) (T = 1 without tensor parallelism)."""
        logits = self.gather(self.router(x))  # (b, t, E): the router reads (and saves) the token shard only
        x = self.gather(x)  # (b, t, h)
        b, t, h = x.shape
        probs, experts, weights, keep = route(logits.reshape(b * t, -1), self.top_k, self.capacity_factor,
                                              rows=b)
        out = self.scatter(self._dispatch(x.reshape(b * t, h), experts, keep).view(b, t, -1))  # (b, t/T, k·h)
        mine = t // self.tp_size  # this rank's token shard of the routing weights
        w = weights.view(b, t, -1)[:, self.tp_rank * mine : (self.tp_rank + 1) * mine]
        y = (out.view(b, mine, self.top_k, h) * w.to(out.dtype).unsqueeze(-1)).sum(2)  # (b, t/T, h)
        if not self.coeff:
            return y
        e = self.num_experts
        counts = torch.zeros(b * t, e, dtype=probs.dtype, device=x.device).scatter_(1, experts, 1.0)
        return self._balance(y, counts.view(b, t, e).sum(1), probs.view(b, t, e).sum(1), ctx, t)

    def _dispatch(self, flat: torch.Tensor, experts: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        """Every routed copy through its expert: (T, h) → (T·k, h) in (token, slot) order, dropped copies 0."""
        tokens, k = experts.shape
        which = experts.reshape(-1)  # (T·k,): routed copy a = token·k + slot
        copy = torch.arange(tokens * k, device=flat.device)
        if keep is not None:
            mask = keep.reshape(-1)
            which, copy = which[mask], copy[mask]
        order = torch.argsort(which, stable=True)  # by expert, token order within an expert
        copy = copy[order]
        counts = torch.bincount(which, minlength=self.num_experts)  # (E,)
        ys = self.dispatcher(flat.index_select(0, copy // k), counts, self.experts)  # (M, h)
        return scatter_rows(ys, copy, tokens * k)  # (T·k, h)

    def _balance(self, y: torch.Tensor, counts: torch.Tensor, sums: torch.Tensor, ctx: object,
                 t: int) -> torch.Tensor:
        """Attach the load-balancing loss of the slice's t tokens: through the slice's routing context, or
        directly (unsliced)."""
        shared: dict = ctx.shared  # type: ignore[attr-defined]
        routing = shared.get(ROUTING)
        e, k = self.num_experts, self.top_k
        if routing is None:  # the whole sequence is here: aux per sequence (b,)
            aux = self.coeff * e * ((counts / (k * t)) * (sums / t)).sum(-1)
            shared.setdefault(AUX_LOSSES, []).append(aux)
            return y
        counts = routing.reduce_counts(counts)  # whole-slice counts under context parallelism
        seq = routing.sequence(self.layer, self.coeff * e / (k * routing.seq_len * routing.normaliser))
        seq.record(routing.start, t, counts, sums.detach())
        return _BalanceGrad.apply(y, sums, seq, 1.0 / self.tp_size)


def _same(x: torch.Tensor) -> torch.Tensor:
    return x


def aux_loss_total(shared: dict, tokens_per_sequence: int, normaliser: float) -> torch.Tensor | float:
    """Σ over the layers and sequences of an unsliced forward of aux · T/N (0 when no MoE layer ran)."""
    terms = shared.get(AUX_LOSSES, [])
    return sum(a.sum() for a in terms) * tokens_per_sequence / normaliser if terms else 0.0
