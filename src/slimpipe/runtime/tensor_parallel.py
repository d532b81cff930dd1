"""Tensor parallelism with sequence parallelism (Megatron-LM; Korthikanti et al. 2022): the primitives.

Convention used below (T = tensor-parallel size, t = tokens of the slice, rank i of the TP group):

* **sequence-parallel region**, ``(b, t/T, h)``: rank i holds tokens [i·t/T, (i+1)·t/T) of the slice.
  Norms, residual adds and pipeline messages live here, so none of them is replicated.
* **tensor-parallel region**, ``(b, t, f/T)``: every token, 1/T of the heads or FFN features.
* entering it, :func:`column_parallel`: all-gather the tokens, multiply by the local rows of wq/wk/wv (or
  w1/w3). Only the token shard is saved: the backward gathers it again (Megatron's choice), so every
  activation the block saves is 1/T of what t = 1 saves — which is what the memory model assumes;
* leaving it, :func:`row_parallel`: multiply by the local columns of wo (or w2), reduce-scatter the
  partial sums over the tokens.

The vocabulary layers are split by rows over T: :func:`vocab_parallel_embedding` (masked lookup, then
reduce-scatter into the sequence-parallel region) and :class:`VocabParallelCrossEntropy` (max, Σexp and
target logit combined over the TP group; no rank ever holds full-vocabulary logits).

Explicit autograd functions, not DTensor's parallel styles: docs/runtime.md "Tensor parallelism" gives the
measurement that decided it (saved bytes and per-slice time).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed import ProcessGroup

__all__ = [
    "TensorParallel", "gather_seq", "scatter_seq", "column_parallel", "row_parallel",
    "vocab_parallel_embedding", "VocabParallelCrossEntropy", "all_gather_seq", "reduce_scatter_seq",
]

_ALL_GATHER = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # torch < 2.13
_REDUCE_SCATTER = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


@dataclass(frozen=True, kw_only=True, slots=True)
class TensorParallel:
    """This rank's place in its tensor-parallel group."""

    group: ProcessGroup | None
    """The T ranks sharing every layer (ParallelState.tp_group); None when T = 1."""
    size: int
    """T."""
    rank: int
    """i in [0, T)."""

    def shard(self, total: int, what: str) -> int:
        """total / T, refusing a remainder (``what`` names the dimension in the error)."""
        if total % self.size:
            raise ValueError(f"{what}={total} is not divisible by the tensor-parallel size {self.size}")
        return total // self.size


# ---- collectives along the token dimension (dim 1) ------------------------------------------------------
def all_gather_seq(x: torch.Tensor, tp: TensorParallel) -> torch.Tensor:
    """(b, t/T, …) on every rank → (b, t, …), rank-ordered token shards."""
    b, tl, *rest = x.shape
    out = x.new_empty((tp.size * b, tl, *rest))  # rank-major: gloo wants the same rank as the input
    _ALL_GATHER(out, x.contiguous(), group=tp.group)
    if b == 1:
        return out.view(1, tp.size * tl, *rest)
    return out.view(tp.size, b, tl, *rest).transpose(0, 1).reshape(b, tp.size * tl, *rest)


def reduce_scatter_seq(x: torch.Tensor, tp: TensorParallel) -> torch.Tensor:
    """(b, t, …) partial sums on every rank → (b, t/T, …) of the total, token shard i on rank i."""
    b, t, *rest = x.shape
    tl = t // tp.size
    parts = x.reshape(b, tp.size, tl, *rest).transpose(0, 1).reshape(tp.size * b, tl, *rest)  # rank-major
    out = x.new_empty((b, tl, *rest))
    _REDUCE_SCATTER(out, parts, group=tp.group)
    return out


class _GatherSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, tp: TensorParallel) -> torch.Tensor:  # type: ignore[override]
        ctx.tp = tp
        return all_gather_seq(x, tp)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return reduce_scatter_seq(grad, ctx.tp), None


class _ScatterSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, tp: TensorParallel) -> torch.Tensor:  # type: ignore[override]
        ctx.tp = tp
        return reduce_scatter_seq(x, tp)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return all_gather_seq(grad, ctx.tp), None


def gather_seq(x: torch.Tensor, tp: TensorParallel) -> torch.Tensor:
    """Sequence-parallel → all tokens: all-gather forward, reduce-scatter backward."""
    return _GatherSeq.apply(x, tp)


def scatter_seq(x: torch.Tensor, tp: TensorParallel) -> torch.Tensor:
    """Partial sums over all tokens → summed token shard: reduce-scatter forward, all-gather backward."""
    return _ScatterSeq.apply(x, tp)


# ---- the linear layers ----------------------------------------------------------------------------------
class _ColumnParallel(torch.autograd.Function):
    """x (b, t/T, h) → x_full @ W_kᵀ for every weight, x_full = the all-gathered tokens; saves only x."""

    @staticmethod
    def forward(ctx, tp: TensorParallel, x: torch.Tensor,  # type: ignore[override]
                *weights: torch.Tensor) -> tuple[torch.Tensor, ...]:
        full = all_gather_seq(x, tp)  # (b, t, h), freed after the forward
        ctx.tp = tp
        ctx.save_for_backward(x, *weights)
        return tuple(nn.functional.linear(full, w) for w in weights)  # (b, t, o_k/T) each

    @staticmethod
    def backward(ctx, *grads: torch.Tensor | None):  # type: ignore[override]
        x, *weights = ctx.saved_tensors
        full = all_gather_seq(x, ctx.tp)  # gathered again instead of saved (1/T of the memory)
        flat = full.reshape(-1, full.size(-1))  # (b·t, h)
        dfull = None
        dws: list[torch.Tensor | None] = []
        for g, w in zip(grads, weights):
            if g is None:
                dws.append(None)
                continue
            dws.append(g.reshape(-1, g.size(-1)).t() @ flat)  # (o_k/T, h)
            part = g @ w  # (b, t, h)
            dfull = part if dfull is None else dfull.add_(part)
        dx = None if dfull is None else reduce_scatter_seq(dfull, ctx.tp)
        return None, dx, *dws


def column_parallel(x: torch.Tensor, *layers: nn.Linear, tp: TensorParallel) -> tuple[torch.Tensor, ...]:
    """Column-parallel linears on the sequence-parallel input x (b, t/T, h): one all-gather for all of them;
    each layer holds its output rows [i·o/T, (i+1)·o/T). Returns (b, t, o_k/T) per layer."""
    return _ColumnParallel.apply(tp, x, *(layer.weight for layer in layers))


def row_parallel(layer: nn.Linear, x: torch.Tensor, tp: TensorParallel) -> torch.Tensor:
    """Row-parallel linear: x (b, t, i/T) times the local input columns, reduce-scattered over tokens →
    (b, t/T, o)."""
    return scatter_seq(layer(x), tp)


# ---- the vocabulary layers -----------------------------------------------------------------------------
def vocab_parallel_embedding(ids: torch.Tensor, weight: torch.Tensor, lo: int,
                             tp: TensorParallel) -> torch.Tensor:
    """ids (b, t) of the whole slice; weight = rows [lo, lo + V/T) → (b, t/T, h) in the SP region."""
    local = ids - lo
    mask = (local >= 0) & (local < weight.size(0))
    part = nn.functional.embedding(local.clamp(0, weight.size(0) - 1), weight)  # (b, t, h)
    part = part * mask.unsqueeze(-1).to(part.dtype)  # ids owned elsewhere contribute 0
    return scatter_seq(part, tp)


class VocabParallelCrossEntropy(torch.autograd.Function):
    """Per-token cross-entropy from vocabulary-sharded logits (N, V/T) (Megatron's vocab-parallel CE).

    One all-reduce of the row maxima, one of (Σexp, target logit); the backward is local:
    softmax − onehot on this rank's columns. Returns the (N,) losses, identical on every TP rank."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor, lo: int,  # type: ignore[override]
                tp: TensorParallel) -> torch.Tensor:
        rows = logits.size(1)
        gmax = logits.max(dim=1).values  # (N,)
        dist.all_reduce(gmax, op=dist.ReduceOp.MAX, group=tp.group)
        e = logits - gmax[:, None]  # (N, V/T), a new tensor: the logits are not modified
        local = target - lo
        mask = (local >= 0) & (local < rows)
        local = local.clamp(0, rows - 1)
        picked = torch.where(mask, e.gather(1, local[:, None])[:, 0], torch.zeros_like(gmax))
        e.exp_()
        stats = torch.stack([e.sum(dim=1), picked])  # (2, N)
        dist.all_reduce(stats, group=tp.group)
        e.div_(stats[0][:, None])  # softmax on this rank's columns
        taken = target >= 0  # −100: no loss at this position (packed documents' boundaries)
        ctx.save_for_backward(e, local, mask, taken)
        return (stats[0].log() - stats[1]) * taken

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        softmax, local, mask, taken = ctx.saved_tensors
        g = softmax.clone()
        idx = torch.arange(g.size(0), device=g.device)[mask]
        g[idx, local[mask]] -= 1.0
        return g.mul_((grad * taken)[:, None]), None, None, None
