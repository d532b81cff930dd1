"""Packed-document cases: document starts per row and the per-token document indices the runtime takes."""

from __future__ import annotations

import torch

__all__ = ["STARTS", "STARTS4", "doc_ids", "dense_mask"]

# Row 0: a 1-token document, a boundary on a slice edge (8), documents inside slices, one crossing two
# slice edges; row 1: one document across the whole row; row 2: a boundary one token before the end.
STARTS = [(0, 1, 8, 11, 12, 30), (0,), (0, 3, 31)]
STARTS4 = [*STARTS, (0, 16, 17)]  # four rows: two data-parallel replicas of two


def doc_ids(starts: list[tuple[int, ...]], seq: int) -> torch.Tensor:
    """(rows, seq+1) document index of every token (the label position s belongs to the last document)."""
    out = torch.zeros(len(starts), seq + 1, dtype=torch.long)
    for r, row in enumerate(starts):
        for x in row[1:]:
            out[r, x:] += 1
    return out


def dense_mask(starts: tuple[int, ...], s: int) -> torch.Tensor:
    """(s, s) document-causal mask of one row: query i sees key j ≤ i of its own document."""
    doc = doc_ids([starts], s - 1)[0, :s]
    return (doc[:, None] == doc[None, :]) & torch.ones(s, s, dtype=torch.bool).tril()
