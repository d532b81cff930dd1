"""The tensor-parallel plan of the Llama decoder: Megatron's TP + sequence parallelism on plain modules.

``parallelize_llama(model, cfg, tp)`` rewrites, in place, whatever parts one pipeline rank holds (in the
spirit of torchtitan's per-model ``parallelize``; the model file stays a plain model):

| module | split over the T ranks of the TP group | communication |
|---|---|---|
| ``attn.wq``, ``attn.wk``, ``attn.wv`` | column-parallel: query heads H/T, K/V heads H_kv/T (rank i: heads [i·H/T, (i+1)·H/T), which use K/V heads [i·H_kv/T, …) under GQA) | one all-gather of the tokens |
| ``attn.wo`` | row-parallel: the input columns of those heads | reduce-scatter of the tokens |
| ``mlp.w1``, ``mlp.w3`` / ``mlp.w2`` | column-parallel (FFN features f/T) / row-parallel | all-gather / reduce-scatter |
| MoE ``mlp.experts.<e>.{w1,w3}`` / ``.w2`` | expert TP: f/T of every expert, on all tokens (models/moe.py) | one all-gather in, one reduce-scatter of the k routed outputs |
| MoE ``mlp.router`` | replicated, routes the all-gathered tokens | gradients summed over TP |
| ``attn_norm``, ``mlp_norm``, ``norm`` | replicated, on the token shard (sequence parallelism) | gradients summed over TP |
| ``embed``, ``head`` | vocabulary rows [i·V/T, (i+1)·V/T) (tied: the same tensor) | reduce-scatter / all-gather; vocab-parallel cross-entropy |

Returns {global parameter name: Shard}: initial values, checkpoints (DTensor placements) and the grad norm
read it.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from slimpipe.config import ModelConfig
from slimpipe.models.base import Shard
from slimpipe.models.moe import MoEMLP
from slimpipe.runtime.tensor_parallel import (
    TensorParallel, VocabParallelCrossEntropy, column_parallel, gather_seq, row_parallel, scatter_seq,
    vocab_parallel_embedding,
)

__all__ = ["parallelize_llama", "VocabParallelEmbedding", "VocabParallelHead", "vocab_parallel_loss"]


class VocabParallelEmbedding(nn.Module):
    """Rows [lo, lo + V/T) of the embedding; ids (b, t) → (b, t/T, h) (sequence-parallel region)."""

    def __init__(self, rows: int, hidden: int, lo: int, tp: TensorParallel) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(rows, hidden))
        self.lo, self.tp = lo, tp

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return vocab_parallel_embedding(ids, self.weight, self.lo, self.tp)


class VocabParallelHead(nn.Module):
    """Output layer rows [lo, lo + V/T) (the embedding's rows when tied): (b, t/T, h) → logits (b, t, V/T)."""

    def __init__(self, rows: int, hidden: int, tied: nn.Module | None, tp: TensorParallel) -> None:
        super().__init__()
        self._tied = [tied] if tied is not None else []  # not registered: the weight belongs to `embed`
        if tied is None:
            self.weight = nn.Parameter(torch.empty(rows, hidden))
        self.tp = tp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self._tied[0].weight if self._tied else self.weight
        (logits,) = column_parallel(x, _Weight(weight), tp=self.tp)
        return logits


class _Weight:
    """A weight passed where column_parallel expects a layer."""

    __slots__ = ("weight",)

    def __init__(self, weight: torch.Tensor) -> None:
        self.weight = weight


def vocab_parallel_loss(logits: torch.Tensor, labels: torch.Tensor, *, lo: int,
                        tp: TensorParallel) -> torch.Tensor:
    """Σ token cross-entropy of logits (b, t, V/T) (this rank's columns) against labels (b, t)."""
    if logits.dtype in (torch.bfloat16, torch.float16):
        logits = logits.float()
    return VocabParallelCrossEntropy.apply(logits.flatten(0, 1), labels.flatten(), lo, tp).sum()


def _split(linear: nn.Linear, dim: int, tp: TensorParallel) -> nn.Linear:
    """A bias-free Linear holding 1/T of ``linear``'s weight along ``dim`` (0: outputs, 1: inputs)."""
    out_f, in_f = linear.out_features, linear.in_features
    if dim == 0:
        return nn.Linear(in_f, tp.shard(out_f, "output features"), bias=False)
    return nn.Linear(tp.shard(in_f, "input features"), out_f, bias=False)


def _block(block: nn.Module, prefix: str, cfg: ModelConfig, tp: TensorParallel) -> dict[str, Shard]:
    attn, mlp = block.attn, block.mlp
    attn.heads = tp.shard(cfg.num_heads, "num_heads")
    attn.kv_heads = tp.shard(cfg.num_kv_heads, "num_kv_heads")
    shards = {}
    owners = [(attn, "attn", ("wq", "wk", "wv"), "wo")]
    if isinstance(mlp, MoEMLP):
        shards |= _experts(mlp, prefix, tp)
    else:
        owners.append((mlp, "mlp", ("w1", "w3"), "w2"))
    for owner, where, col, row in owners:
        for name, dim in [(c, 0) for c in col] + [(row, 1)]:
            setattr(owner, name, _split(getattr(owner, name), dim, tp))
            shards[f"{prefix}.{where}.{name}.weight"] = Shard(dim=dim, index=tp.rank, count=tp.size)
        owner.columns = partial(column_parallel, tp=tp)  # the model's TP seams (models/llama.py)
        owner.rows = partial(row_parallel, tp=tp)
    return shards


def _experts(moe: MoEMLP, prefix: str, tp: TensorParallel) -> dict[str, Shard]:
    """Expert tensor parallelism (expert-TP = T, Megatron's default): every expert's w1/w3 by output rows,
    w2 by input columns, computed locally on the all-gathered tokens (the MoE layer's gather/scatter seams
    do the communication once per layer); the router stays whole (gradients summed over TP)."""
    shards = {}
    for e, expert in moe.experts.items():
        for name, dim in (("w1", 0), ("w3", 0), ("w2", 1)):
            setattr(expert, name, _split(getattr(expert, name), dim, tp))
            shards[f"{prefix}.mlp.experts.{e}.{name}.weight"] = Shard(dim=dim, index=tp.rank, count=tp.size)
    moe.gather, moe.scatter = partial(gather_seq, tp=tp), partial(scatter_seq, tp=tp)
    moe.tp_rank, moe.tp_size = tp.rank, tp.size
    return shards


def parallelize_llama(model: nn.Module, cfg: ModelConfig, tp: TensorParallel) -> dict[str, Shard]:
    """Apply the plan above to the parts ``model`` holds (attributes embed, layers, norm, head)."""
    shards: dict[str, Shard] = {}
    for i, block in getattr(model, "layers", {}).items():
        shards |= _block(block, f"layers.{i}", cfg, tp)
    if not (hasattr(model, "embed") or hasattr(model, "head")):
        return shards
    rows = tp.shard(cfg.vocab_size, "vocab_size")
    vocab = Shard(dim=0, index=tp.rank, count=tp.size)
    if hasattr(model, "embed"):
        model.embed = VocabParallelEmbedding(rows, cfg.hidden, tp.rank * rows, tp)
        shards["embed.weight"] = vocab
    if hasattr(model, "head"):
        tied = model.embed if cfg.tie_embeddings else None
        model.head = VocabParallelHead(rows, cfg.hidden, tied, tp)
        if tied is None:
            shards["head.weight"] = vocab
        model.cross_entropy = partial(vocab_parallel_loss, lo=tp.rank * rows, tp=tp)
    return shards
