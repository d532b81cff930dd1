"""The small typed ports through which features plug into the executor (instead of writing its fields).

* :class:`AttentionHook` — replaces one slice's attention, layer by layer. The attention context
  exchange (runtime/exchange.py) returns one from ``on_forward`` for an exchanged unit; the executor
  installs it on the unit's :class:`~slimpipe.runtime.kv.SliceKV`. Without a hook a slice attends through
  ``SliceKV.local_attention``: the rank's slice attention over its K/V blocks, or under context
  parallelism the CP group's query-out attention (``KVStore.cp``, runtime/context_parallel.py), which a
  hook composes with by naming its partners on the slice's window.
* :class:`EndsPort` — what the vocabulary-parallel ends (runtime/vocab.py: VE/VH/VB) read from and hand to
  the executor of their rank: the embedding output that becomes F(stage 0)'s input, the gradient B(stage 0)
  produced for it, the last stage's output that VH consumes and the output gradient VH returns for
  B(last stage), plus the step's ids and labels (this rank's share under context parallelism), slice
  bounds, loss and busy-time accumulators.
  :class:`~slimpipe.runtime.executor.RankExecutor` implements it.
"""

from __future__ import annotations

from typing import Protocol

import torch

from slimpipe.runtime.slice_attention import Window

__all__ = ["AttentionHook", "EndsPort"]


class AttentionHook(Protocol):
    """One unit's attention, layer by layer, in place of the local slice attention."""

    def attend(self, layer_id: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               window: Window) -> torch.Tensor:
        """q (b, t, H, d) and the slice's own k/v (b, t, H_kv, d) over the earlier slices' K/V blocks in
        ``window`` (slice_attention.Window: the store's blocks and the dK/dV hand-down) -> (b, t, H, d)."""
        ...


class EndsPort(Protocol):
    """The executor as the vocabulary-parallel ends see it (one rank, one step)."""

    tokens: torch.Tensor
    """(m, s+1) token ids of this step."""
    ids: torch.Tensor
    """(m, s') the ids this rank feeds: the sequence (s' = s), or its CP share in zig-zag order (s/c)."""
    labels: torch.Tensor
    """(m, s') the next-token labels of ``ids`` (the next *global* token under context parallelism; −100
    where no loss is taken: a packed document's boundary)."""
    bounds: list[int]
    """Slice boundaries in the rows of ``ids``: slice j is [bounds[j], bounds[j+1])."""
    dtype: torch.dtype
    """Activation dtype."""
    normaliser: float
    """Tokens of the global batch (the loss is a sum divided by this)."""

    def put_embedding(self, mb: int, j: int, x: torch.Tensor) -> None:
        """The embedded slice (1, t, h), a leaf requiring grad: the input of F(stage 0, mb, j)."""
        ...

    def take_embedding_grad(self, mb: int, j: int) -> torch.Tensor:
        """The gradient B(stage 0, mb, j) produced for its input (1, t, h)."""
        ...

    def take_head_input(self, mb: int, j: int) -> torch.Tensor:
        """The last stage's output of (mb, j) (1, t, h), a leaf requiring grad."""
        ...

    def put_head_grad(self, mb: int, j: int, grad: torch.Tensor) -> None:
        """The output gradient (1, t, h) of B(last stage, mb, j)."""
        ...

    def add_loss(self, loss: torch.Tensor) -> None:
        """Add a (float64, already normalised) loss term to the step's loss."""
        ...

    def add_busy(self, seconds: float) -> None:
        """Add compute time spent outside the executor's own actions."""
        ...
