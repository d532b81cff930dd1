"""Tensor-parallel pieces in checkpoints: DTensors over the TP mesh, so DCP reshards them across t.

A TP rank holds 1/T of every split weight (``RankModel.tp_shards``) under its global name. Saved as a plain
tensor that would be one rank's piece posing as the whole; wrapped as a ``DTensor`` with placement
``Shard(dim)`` on ``mesh["tp"]`` DCP records the global shape and each piece's offset, writes every piece
once, and on load reads exactly the rows or columns the loading rank owns — whatever its t (a checkpoint
written at t2·p2 loads at t1·p4 and t4·p1). Replicated tensors (norm weights) stay plain: identical on every
TP rank, DCP keeps one copy. AdamW moments have their parameter's shape and placement.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch.distributed.device_mesh import DeviceMesh

from slimpipe.models.base import Shard

__all__ = ["TPLayout", "local_tensors"]


@dataclass(frozen=True, kw_only=True, slots=True)
class TPLayout:
    """How one rank's tensors map onto the global ones."""

    mesh: DeviceMesh
    """The 1-D TP mesh (``ParallelState.mesh["tp"]``)."""
    shards: Mapping[str, Shard]
    """Global parameter name → this rank's piece (RankModel.tp_shards)."""

    def wrap(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` (the piece of parameter ``name``, or its AdamW moment) as a DTensor; else unchanged."""
        from torch.distributed.tensor import DTensor
        from torch.distributed.tensor import Shard as Placement

        shard = self.shards.get(name)
        if shard is None or tensor.dim() == 0:
            return tensor
        full = torch.Size(shard.full_shape(tensor.shape))
        stride = [1] * len(full)
        for d in range(len(full) - 2, -1, -1):
            stride[d] = stride[d + 1] * full[d + 1]
        return DTensor.from_local(tensor, self.mesh, [Placement(shard.dim)], run_check=False, shape=full,
                                  stride=tuple(stride))

    def model_state(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {name: self.wrap(name, t) for name, t in state.items()}

    def optim_state(self, state: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        return {name: {k: self.wrap(name, v) if isinstance(v, torch.Tensor) else v for k, v in st.items()}
                for name, st in state.items()}


def local_tensors(tree: Any) -> Any:
    """DTensors anywhere in nested dicts → their local tensors (what the runtime's parameters hold)."""
    if isinstance(tree, dict):
        return {k: local_tensors(v) for k, v in tree.items()}
    to_local = getattr(tree, "to_local", None)
    return to_local() if callable(to_local) else tree
