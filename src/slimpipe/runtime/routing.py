"""MoE routing statistics of one rank's step: the load-balancing loss of sliced sequences (models/moe.py).

Every MoE layer of every slice records its routed-copy counts and router-probability sums in the
:class:`~slimpipe.models.moe.SequenceRouting` of its (layer, micro-batch); the slice's backward reads the
sequence's complete counts, and :meth:`RoutingBook.aux_loss` adds the values once the step's forwards are
done. The executor attaches one :class:`SliceRouting` per forward to the slice's shared scratch.

Under context parallelism a rank routes only its zig-zag pieces of every slice (s/c tokens of each
sequence): the expert counts, which the balancing gradient needs for the whole sequence, are summed over
the CP group as each slice records them, and the loss scale uses the global sequence length; each CP rank
then holds its tokens' share of the probability sums, and the step's loss sum over dp·cp adds them up.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from slimpipe.models.moe import ROUTING, SequenceRouting

__all__ = ["RoutingBook", "SliceRouting"]


class RoutingBook:
    """The SequenceRouting of every (layer, micro-batch) of one rank in one step."""

    def __init__(self) -> None:
        self.seq_len, self.normaliser, self.cp_size, self.cp_group = 0, 1.0, 1, None
        self._seqs: dict[tuple[int, int], SequenceRouting] = {}

    def begin_step(self, seq_len: int, normaliser: float, *, cp_size: int = 1, cp_group: object = None) -> None:
        """seq_len: tokens of a sequence this rank routes (s, or s/c under context parallelism)."""
        self.seq_len, self.normaliser = seq_len, float(normaliser)
        self.cp_size, self.cp_group = cp_size, cp_group
        self._seqs.clear()

    def reduce_counts(self, counts: torch.Tensor) -> torch.Tensor:
        """Expert counts of one slice summed over the CP group (a collective when c > 1)."""
        if self.cp_size > 1:
            dist.all_reduce(counts, group=self.cp_group)
        return counts

    def attach(self, shared: dict[str, object], microbatch: int, start: int) -> None:
        """Give the MoE layers of one slice forward their routing context."""
        shared[ROUTING] = SliceRouting(self, microbatch, start)

    def sequence(self, layer: int, microbatch: int, scale: float) -> SequenceRouting:
        """The statistics of (layer, micro-batch), created by its first slice."""
        key = (layer, microbatch)
        if key not in self._seqs:
            self._seqs[key] = SequenceRouting(seq_len=self.seq_len, scale=scale)  # this rank's tokens
        return self._seqs[key]

    def aux_loss(self, device: torch.device) -> torch.Tensor:
        """Σ of the load-balancing loss over this rank's layers and micro-batches (float64, 0-dim)."""
        total = torch.zeros((), dtype=torch.float64, device=device)
        for seq in self._seqs.values():
            total += seq.value().double()
        return total


class SliceRouting:
    """RoutingContext of one slice forward."""

    __slots__ = ("_book", "_mb", "start", "seq_len", "normaliser")

    def __init__(self, book: RoutingBook, microbatch: int, start: int) -> None:
        self._book, self._mb, self.start = book, microbatch, start
        self.seq_len, self.normaliser = book.seq_len * book.cp_size, book.normaliser

    def sequence(self, layer: int, scale: float) -> SequenceRouting:
        return self._book.sequence(layer, self._mb, scale)

    def reduce_counts(self, counts: torch.Tensor) -> torch.Tensor:
        return self._book.reduce_counts(counts)
