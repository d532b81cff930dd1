"""Layers → stages → ranks, the per-rank module holding them, and one stage's forward over one slice.

Megatron's interleaved assignment (SlimPipe reference §1): stage s = k·p + r (virtual stage k of rank r)
holds layers [s·l, (s+1)·l) with l = L/(p·v). Stage 0 also holds the embedding; the last stage the final
norm, the output layer and the loss. Every rank keeps its stages' parts in one :class:`RankModel` whose
parameter names are global (``layers.17.attn.wq.weight``), so checkpoints reshard across layouts. With tied
embeddings and p > 1 the last rank keeps a replica of ``embed.weight`` whose gradient is summed with rank
0's (Megatron's embedding group) and which the grad norm counts once.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from slimpipe.config import ConfigError, ModelConfig
from slimpipe.models.base import DecoderParts, PlainContext, Shard, init_parameters
from slimpipe.models.llama import LlamaParts
from slimpipe.models.moe import ExpertPlacement, aux_loss_total
from slimpipe.runtime.tensor_parallel import TensorParallel

__all__ = [
    "StageInfo", "RankModel", "stages_of_rank", "slice_bounds", "stage_forward", "as_parts",
    "build_rank_model", "reference_loss", "full_cross_entropy",
]


def as_parts(model: ModelConfig | DecoderParts, placement: ExpertPlacement | None = None) -> DecoderParts:
    """A ModelConfig becomes LlamaParts (holding the experts ``placement`` names, default all); a user's
    DecoderParts is used as is."""
    if isinstance(model, ModelConfig):
        return LlamaParts(model, placement=placement)
    if placement is not None:
        raise ConfigError("expert parallelism needs a ModelConfig (the built-in MoE blocks): use --ep 1 with "
                          "your own DecoderParts")
    if not isinstance(model, DecoderParts):
        raise TypeError(f"model must be a ModelConfig or a DecoderParts, got {type(model).__name__}")
    return model


@dataclass(frozen=True, kw_only=True, slots=True)
class StageInfo:
    """One global stage as a rank sees it."""

    stage: int
    """Global stage index s = k·p + r."""
    layers: tuple[int, ...]
    """Global indices of the layers it holds, in order."""
    first: bool
    """Holds the embedding (s = 0)."""
    last: bool
    """Holds the final norm, output layer and loss (s = p·v − 1)."""


def stages_of_rank(num_layers: int, p: int, v: int, rank: int) -> list[StageInfo]:
    """The stages of pipeline rank ``rank`` in virtual-stage order (Megatron's mapping)."""
    if num_layers % (p * v):
        raise ConfigError(
            f"num_layers={num_layers} is not divisible by p·v={p}·{v}: every stage needs the same number "
            f"of layers; choose p and v whose product divides {num_layers}"
        )
    per = num_layers // (p * v)
    out = []
    for k in range(v):
        s = k * p + rank
        out.append(StageInfo(stage=s, layers=tuple(range(s * per, (s + 1) * per)), first=s == 0,
                             last=s == p * v - 1))
    return out


def slice_bounds(seq_len: int, fractions: Sequence[float]) -> list[int]:
    """Token boundaries [0, b1, …, s] of the slices, rounded from cumulative fractions (ints summing to s)."""
    bounds, cum = [0], 0.0
    for f in fractions[:-1]:
        cum += f
        bounds.append(int(round(cum * seq_len)))
    bounds.append(seq_len)
    if any(b1 <= b0 for b0, b1 in zip(bounds, bounds[1:])):
        raise ConfigError(
            f"sequence length {seq_len} cannot be cut into {len(fractions)} non-empty slices with fractions "
            f"{tuple(round(f, 4) for f in fractions)}: use a longer sequence or fewer slices"
        )
    return bounds


def full_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Σ token cross-entropy of logits (b, t, V) against labels (b, t), in fp32 at least."""
    if logits.dtype in (torch.bfloat16, torch.float16):
        logits = logits.float()
    return nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum")


class RankModel(nn.Module):
    """The parts one rank holds, registered under their global names."""

    def __init__(self, parts: DecoderParts, layer_ids: Sequence[int], *, has_embed: bool,
                 has_head: bool) -> None:
        super().__init__()
        self.tied = parts.tie_embeddings
        self.embed_replica = has_head and self.tied and not has_embed
        if has_embed or self.embed_replica:
            self.embed = parts.embedding()
        self.layers = nn.ModuleDict({str(i): parts.block(i) for i in layer_ids})
        if has_head:
            self.norm = parts.final_norm()
            self.head = parts.head(self.embed if self.tied else None)
        self.cross_entropy = full_cross_entropy  # the TP plan swaps in the vocabulary-parallel one
        self.tp_shards: dict[str, Shard] = {}  # global name -> this rank's piece (tensor parallelism)
        self.tp_rank = 0
        self.sharded: set[str] = set()  # names whose ranks hold disjoint pieces (TP or vocabulary shards)

    def norm_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters the global grad norm counts on this rank: a tied replica is counted on pp rank 0, a
        parameter every TP rank holds whole on TP rank 0."""
        for name, param in self.named_parameters():
            if self.embed_replica and name == "embed.weight":
                continue
            if self.tp_rank and name not in self.sharded:
                continue
            yield param

    def tp_replicated(self) -> list[nn.Parameter]:
        """Parameters every TP rank holds whole (norm weights): with sequence parallelism each rank's
        gradient covers its tokens only, so they are summed over the TP group."""
        return [p for name, p in self.named_parameters() if name not in self.sharded]


def build_rank_model(parts: DecoderParts, stages: Sequence[StageInfo], *, seed: int, device: torch.device,
                     dtype: torch.dtype, tp: TensorParallel | None = None) -> RankModel:
    """Build on the CPU in float32, apply the tensor-parallel plan (tp.size > 1), initialise from
    (seed, global name) — each TP rank keeps its piece of the full draw — then move and cast."""
    layers = [i for st in stages for i in st.layers]
    model = RankModel(parts, layers, has_embed=any(s.first for s in stages),
                      has_head=any(s.last for s in stages))
    if tp is not None and tp.size > 1:
        plan = getattr(parts, "parallelize", None)
        if plan is None:
            raise ConfigError(
                f"tensor parallelism (tp={tp.size}) needs a model with a tensor-parallel plan "
                f"({type(parts).__name__} has no parallelize method): use LlamaParts or tp=1"
            )
        model.tp_shards, model.tp_rank = plan(model, tp), tp.rank
        model.sharded = set(model.tp_shards)
    init_parameters(parts, model.named_parameters(), seed, model.tp_shards)
    return model.to(device=device, dtype=dtype)


def _loss(model: RankModel, x: torch.Tensor, labels: torch.Tensor, normaliser: float) -> torch.Tensor:
    logits = model.head(model.norm(x))  # (b, t, V), or (b, t, V/T) vocabulary-sharded under TP
    # per-slice sum over the GLOBAL batch's token count: slices add up to the mean
    return model.cross_entropy(logits, labels) / normaliser


def stage_forward(model: RankModel, info: StageInfo, inp: torch.Tensor, slice_kv, labels: torch.Tensor | None,
                  normaliser: float) -> torch.Tensor:
    """One stage over one slice: ids (b, t) or hidden (b, t, h) -> hidden (b, t, h) or the slice's loss."""
    x = model.embed(inp) if info.first else inp
    full = slice_kv.store.recompute == "full"  # the whole block is a recompute region (any block type)
    for i in info.layers:
        block, ctx = model.layers[str(i)], slice_kv.layer(i)
        x = slice_kv.checkpoint(block, x, ctx) if full else block(x, ctx)
    if info.last:
        assert labels is not None
        return _loss(model, x, labels, normaliser)
    return x


def reference_loss(model: RankModel, tokens: torch.Tensor, normaliser: float | None = None, *,
                   documents: torch.Tensor | None = None, restart_positions: bool = True) -> torch.Tensor:
    """Unsliced, unpipelined loss of a whole-model RankModel on tokens (B, s+1): the equivalence oracle.

    ``documents`` (B, s+1): packed documents, row by row with a dense document-causal mask (PlainContext),
    positions per document (``restart_positions``), no loss where the next token opens another document."""
    ids, labels = tokens[:, :-1], tokens[:, 1:]
    if documents is not None:  # no loss where the next token opens another document
        labels = labels.masked_fill(documents[:, 1:] != documents[:, :-1], -100)
    norm = float((labels >= 0).sum()) if normaliser is None else normaliser
    # The whole batch at once; packed documents one row at a time (one dense mask per row).
    runs = [(slice(None), PlainContext())] if documents is None else [
        (slice(r, r + 1), PlainContext(documents[r, :-1], restart_positions=restart_positions))
        for r in range(tokens.size(0))]
    losses = []
    for rows, ctx in runs:
        x = model.embed(ids[rows])
        for blk in model.layers.values():
            x = blk(x, ctx)
        # MoE: each sequence's load-balancing loss, weighted by its token share (models/moe.py).
        losses.append(_loss(model, x, labels[rows], norm) + aux_loss_total(ctx.shared, labels.size(1), norm))
    return torch.stack(losses).sum()


def reference_logits(model: RankModel, ids: torch.Tensor) -> torch.Tensor:
    """Unsliced, unpipelined logits (B, s, V) of a whole-model RankModel on ids (B, s)."""
    x = model.embed(ids)
    ctx = PlainContext()
    for blk in model.layers.values():
        x = blk(x, ctx)
    return model.head(model.norm(x))


def build_reference(model: ModelConfig | DecoderParts, *, seed: int, dtype: torch.dtype = torch.float32,
                    device: torch.device | str = "cpu") -> RankModel:
    """The whole model in one RankModel (same names and initial weights as any pipelined layout)."""
    parts = as_parts(model)
    whole = StageInfo(stage=0, layers=tuple(range(parts.num_layers)), first=True, last=True)
    return build_rank_model(parts, [whole], seed=seed, device=torch.device(device), dtype=dtype)


__all__ += ["build_reference", "reference_logits"]
