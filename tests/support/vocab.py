"""The vocab-parallel tests' helpers: a tiny model with an odd vocabulary (padded shards), references."""

from __future__ import annotations

import torch

from slimpipe.config import ModelConfig
from slimpipe.schedule.builders import build
from tests.support.dist import run_dist
from tests.support.models import RTOL, max_rel_error, unsliced_reference

__all__ = ["RTOL", "VOCAB", "SEQ", "SEED", "case_model", "case_tokens", "reference", "full_grads",
           "max_rel_error", "run_dist"]

VOCAB = 61  # prime: p = 2 and p = 4 both leave padding rows in the last shard
SEQ = 32
SEED = 7
TINY = ModelConfig(name="vocab-test", num_layers=2, hidden=32, ffn=64, num_heads=4, num_kv_heads=2,
                   head_dim=8, vocab_size=VOCAB)
SHARDED = ("embed.weight", "head.weight")


def case_model(name: str, p: int, n: int, m: int, v: int, tied: bool):
    """One layer per stage; the builder's default warm-up."""
    return TINY.replace(num_layers=p * v, tie_embeddings=tied), build(name, p=p, m=m, n=n, v=v)


def case_tokens(rows: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (rows, SEQ + 1), generator=torch.Generator().manual_seed(rows))


def reference(layers: int, tied: bool, rows: int) -> tuple[float, dict[str, torch.Tensor]]:
    """Loss and gradients of the unsliced single-process model (float64) on case_tokens(rows), once per
    session."""
    return unsliced_reference(TINY.replace(num_layers=layers, tie_embeddings=tied), rows, seq=SEQ,
                              vocab=VOCAB, token_seed=rows, seed=SEED)


def full_grads(per_rank: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Per-rank gradients (rank order) → one dict: vocabulary shards concatenated and unpadded."""
    out: dict[str, torch.Tensor] = {}
    for name in {n for g in per_rank for n in g}:
        parts = [g[name] for g in per_rank if name in g]
        out[name] = torch.cat(parts)[:VOCAB] if name in SHARDED else parts[0]
    return out
