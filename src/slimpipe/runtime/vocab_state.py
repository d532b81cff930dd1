"""Full-vocabulary model and optimizer state for a vocab-parallel runtime (checkpoints, inspection).

Under vocab_parallel every rank holds rows of ``embed.weight`` (and ``head.weight`` when untied) under the
global name. Checkpoints must not store those shards under that name (DCP would keep one rank's rows as
"the" tensor), so the state dicts built here carry the FULL (V, h) tensors, gathered over the pipeline:
identical on every rank, which DCP deduplicates like any replicated tensor. Loading cuts each rank's rows
back out. A checkpoint written with p = 4 therefore loads with p = 2, with or without vocab_parallel, and
into the runtime without it (whose end stages hold the full matrices).

A :class:`VocabLayout` tells these functions which ranks this process holds (PipelineRuntime: one;
LocalPipelineRuntime: all) and how to collect one tensor per rank (all_gather, or the local list).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from slimpipe.runtime.stage import RankModel
from slimpipe.runtime.vocab import VOCAB_SHARDED, VocabShard

__all__ = ["VocabLayout", "full_model_state", "load_model_state", "full_optim_state", "load_optim_state",
           "dist_gather"]


@dataclass(frozen=True, kw_only=True, slots=True)
class VocabLayout:
    """The vocab-parallel ranks held by this process."""

    vocab: int
    """V (rows of the full tensors)."""
    members: tuple[tuple[RankModel, VocabShard], ...]
    """(rank model, its shard) of every pipeline rank this process holds, in rank order."""
    gather: Callable[[list[torch.Tensor]], list[torch.Tensor]]
    """One tensor per member → the p tensors of all pipeline ranks in rank order (a collective when
    distributed: every rank must call it in the same order)."""

    def full(self, shards: list[torch.Tensor]) -> torch.Tensor:
        """(rows, …) per member → the full (V, …) tensor."""
        return torch.cat(self.gather([t.detach().contiguous() for t in shards]), dim=0)[: self.vocab]


def dist_gather(group: object, p: int) -> Callable[[list[torch.Tensor]], list[torch.Tensor]]:
    """all_gather over the pipeline group (one member per process)."""
    import torch.distributed as dist

    def gather(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        (mine,) = tensors
        out = [torch.empty_like(mine) for _ in range(p)]
        dist.all_gather(out, mine, group=group)
        return out

    return gather


def _cut(full: torch.Tensor, shard: VocabShard) -> torch.Tensor:
    rows = full.new_zeros((shard.rows, *full.shape[1:]))
    rows[: shard.valid] = full[shard.lo : shard.lo + shard.valid]
    return rows


def full_model_state(layout: VocabLayout) -> dict[str, torch.Tensor]:
    """Every parameter of the members under its global name; vocabulary shards as full tensors."""
    out: dict[str, torch.Tensor] = {}
    for model, _ in layout.members:
        for name, t in model.state_dict().items():
            if name not in VOCAB_SHARDED:
                out.setdefault(name, t)
    for name in VOCAB_SHARDED:
        shards = [model.state_dict().get(name) for model, _ in layout.members]
        if shards[0] is not None:
            out[name] = layout.full(shards)  # type: ignore[arg-type]
    return out


def load_model_state(layout: VocabLayout, state: dict[str, torch.Tensor]) -> None:
    """Load full-vocabulary tensors (and the rest) into each member's shard."""
    for model, shard in layout.members:
        own = model.state_dict()
        model.load_state_dict({k: _cut(state[k], shard) if k in VOCAB_SHARDED else state[k] for k in own})


def _state_of(optimizer: torch.optim.Optimizer, p: torch.Tensor, template: bool) -> dict[str, Any] | None:
    st = optimizer.state.get(p)
    if st or not template:
        return dict(st) if st else None
    on_device = bool(optimizer.defaults.get("fused") or optimizer.defaults.get("capturable"))
    step = torch.zeros((), dtype=torch.float32, device=p.device if on_device else "cpu")
    return {"step": step, "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}


def full_optim_state(layout: VocabLayout, optimizer: torch.optim.Optimizer, *,
                     template: bool) -> dict[str, dict[str, Any]]:
    """AdamW state by global name (checkpoint layout); vocabulary shards' moments as full tensors.

    ``template``: zeros where no state exists yet (the shapes DCP loads into). All shards of one tensor
    are stepped together, so they have state on every rank or on none.
    """
    out: dict[str, dict[str, Any]] = {}
    for model, _ in layout.members:
        for name, p in model.named_parameters():
            if name not in VOCAB_SHARDED and name not in out:
                st = _state_of(optimizer, p, template)
                if st is not None:
                    out[name] = st
    for name in VOCAB_SHARDED:
        params = [dict(model.named_parameters()).get(name) for model, _ in layout.members]
        if params[0] is None:
            continue
        states = [_state_of(optimizer, p, template) for p in params]
        if states[0] is None:
            continue
        moments = ("exp_avg", "exp_avg_sq")
        full = {k: layout.full([s[k] for s in states]) for k in moments}  # type: ignore[index]
        out[name] = {**states[0], **full}  # type: ignore[dict-item]
    return out


def load_optim_state(layout: VocabLayout, optimizer: torch.optim.Optimizer,
                     state: dict[str, dict[str, Any]]) -> None:
    """Give each member's parameters their (sliced, copied) AdamW state from ``state``."""
    for model, shard in layout.members:
        for name, p in model.named_parameters():
            st = state[name]
            optimizer.state[p] = {k: _cut(v, shard) if name in VOCAB_SHARDED and k != "step" else v.clone()
                                  for k, v in st.items()}
