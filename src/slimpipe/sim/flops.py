"""FLOPs of the Llama/Mixtral block, per layer and slice, and Seq1F1B's computation-balanced partition.

Readable like nanoGPT's ``estimate_mfu``: FLOPs are counted per layer for one slice of T tokens that sees
a K/V prefix of P tokens (full-sequence token counts, before any sharding):

* attention projections (GQA): ``2·T·h·(q + 2·d_kv)`` (Q, K, V) + ``2·T·q·h`` (output);
* causal attention with a prefix: QKᵀ and AV each ``2·q`` FLOPs per (query, key) pair, and the queries of
  the slice see ``T·P + T²/2`` keys in all: ``4·q·(T·P + T²/2)``. Slice j of n equal slices (block
  b = s/n, P = j·b) costs ``4·q·b²·(j + ½)``; summed over j that is the unsliced causal ``4·q·s²/2``;
* SwiGLU MLP ``6·T·h·f``; MoE: top-k of E experts, ``k·6·T·h·f`` plus the router ``2·T·h·E``;
* output layer ``2·T·h·V`` (+ loss, not counted); embedding lookup: no FLOPs.

The cost model (``slimpipe.sim.cost``) prices these FLOPs; ``seq1f1b_partition`` (Seq1F1B, and SlimPipe's
equal-FLOP slice split) balances them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from slimpipe.config import ModelConfig

__all__ = ["ATTN_BWD_FACTOR", "LayerFlops", "layer_flops", "linear_shapes", "seq1f1b_partition"]

ATTN_BWD_FACTOR = 2.5
"""Backward/forward FLOP ratio of fused attention (5 matmuls against 2; flash attention recomputes QKᵀ)."""


@dataclass(frozen=True, slots=True)
class LayerFlops:
    """Forward FLOPs of one layer for one slice, split by the kernel efficiency they run at."""

    linear: float
    """GEMM FLOPs (projections, MLP/experts, router)."""
    attention: float
    """Core attention FLOPs (QKᵀ and AV over the causal prefix)."""
    fc1: float
    """The fc1 (gate + up) part of ``linear``: what partial+fc1 recomputation replays."""


def layer_flops(model: ModelConfig, tokens: float, prefix: float, *,
                pairs: tuple[float, float] | None = None) -> LayerFlops:
    """Forward FLOPs of one transformer layer for ``tokens`` queries after a K/V prefix of ``prefix``;
    ``pairs`` = (prefix, diagonal) query-key pairs instead of (T·P, T²/2) (packed documents)."""
    h, q, kv, f = model.hidden, model.q_dim, model.kv_dim, model.ffn
    k = model.top_k if model.num_experts > 1 else 1
    proj = 2 * tokens * h * (q + 2 * kv) + 2 * tokens * q * h
    fc1 = k * 2 * tokens * h * 2 * f
    mlp = k * 2 * tokens * h * 3 * f
    router = 2 * tokens * h * model.num_experts if model.num_experts > 1 else 0
    prefix_pairs, diagonal_pairs = pairs if pairs is not None else (tokens * prefix, tokens * tokens / 2)
    attention = 4 * q * (prefix_pairs + diagonal_pairs)
    return LayerFlops(linear=proj + mlp + router, attention=attention, fc1=fc1)


def linear_shapes(model: ModelConfig, t: int, etp: int) -> list[tuple[int, int, float]]:
    """(in, out, token share) of every linear layer of one block on one GPU, per all-gathered SP token.

    Under TP column-parallel layers split out and row-parallel ones split in, over all s/c tokens; the
    router is whole on the SP-sharded tokens (share 1/t); MoE lists the top-k expert MLPs, sharded over
    expert-TP (expert-TP = 1: whole experts on 1/t of the tokens, balanced routing).
    """
    h, q, kv, f = model.hidden, model.q_dim, model.kv_dim, model.ffn
    shapes = [(h, q // t, 1.0), (h, kv // t, 1.0), (h, kv // t, 1.0), (q // t, h, 1.0)]
    if model.num_experts == 1:
        return shapes + [(h, f // t, 1.0), (h, f // t, 1.0), (f // t, h, 1.0)]
    share = 1.0 if etp == t else 1.0 / t
    shapes += model.top_k * [(h, f // etp, share), (h, f // etp, share), (f // etp, h, share)]
    return shapes + [(h, model.num_experts, 1.0 / t)]


def seq1f1b_partition(model: ModelConfig, seq_len: int, k: int, *, multiple: int = 1) -> tuple[float, ...]:
    """Seq1F1B's computation-balanced segments: lengths whose prefix-aware forward FLOPs are total/k each.

    Solved from the end of the sequence (the last segment sees the longest prefix, so it is the shortest);
    boundaries are rounded to ``multiple`` tokens (e.g. t·2c); the first segment takes the rest. Returns
    slice_weights (fractions of ``seq_len``, summing to 1), for ``build(..., slice_weights=...)``.
    """
    if k == 1:
        return (1.0,)
    whole = layer_flops(model, seq_len, 0)
    target = (whole.linear + whole.attention) / k
    lin = layer_flops(model, 1, 0).linear  # linear FLOPs per token
    q4 = 4 * model.q_dim
    lengths: list[int] = []
    end = float(seq_len)
    for _ in range(k - 1):
        # lin·x + 4q·(x·(end − x) + x²/2) = target  →  2q·x² − (lin + 4q·end)·x + target = 0
        a, b = q4 / 2, lin + q4 * end
        x = (b - math.sqrt(max(b * b - 4 * a * target, 0.0))) / (2 * a)
        x = max(multiple, round(x / multiple) * multiple)
        lengths.append(int(x))
        end -= x
    first = seq_len - sum(lengths)
    if first < multiple:
        raise ValueError(
            f"seq1f1b_partition: seq_len={seq_len} too short for k={k} segments of ≥ {multiple} tokens"
        )
    lengths.append(first)
    lengths.reverse()  # (first, …, last)
    return tuple(x / seq_len for x in lengths)
