"""Which part of a full gradient a rank of a (tp, pp) layout holds: TP pieces and vocabulary rows."""

from __future__ import annotations

import torch

from slimpipe.runtime.vocab import vocab_rows

__all__ = ["tp_piece"]

_SPLIT_DIM = {"wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "wo": 1, "w2": 1}  # column / row parallel


def tp_piece(name: str, ref: torch.Tensor, *, t: int, p: int, pp_rank: int, tp_rank: int,
             vocab_parallel: bool, vocab: int) -> torch.Tensor:
    """The part of the full reference gradient ``ref`` of parameter ``name`` that TP rank ``tp_rank`` of
    pipeline rank ``pp_rank`` holds: column/row pieces, the embedding/head's vocabulary rows over t (or over
    t·p, zero-padded, with vocab_parallel), norm weights whole."""
    if vocab_parallel and name in ("embed.weight", "head.weight"):
        rows = vocab_rows(vocab, t * p)
        lo = (pp_rank * t + tp_rank) * rows
        piece = ref.new_zeros(rows, ref.size(1))
        valid = max(0, min(rows, vocab - lo))
        piece[:valid] = ref[lo: lo + valid]
        return piece
    dim = 0 if name in ("embed.weight", "head.weight") else _SPLIT_DIM.get(name.split(".")[-2])
    if dim is None or t == 1:
        return ref
    size = ref.size(dim) // t
    return ref.narrow(dim, tp_rank * size, size)
