"""MoE cases: a tiny Mixtral-style model (4 experts, top-2) and its unsliced reference, cached per session."""

from __future__ import annotations

import functools

import torch

from slimpipe.config import ModelConfig
from tests.support.documents import STARTS4, doc_ids
from tests.support.models import reference_grads, tokens

__all__ = ["SEQ", "SEED", "MOE", "moe_model", "reference", "packed_documents"]

SEQ = 32
SEED = 11
# h 32, 4 SwiGLU experts of f 32, top-2, a strong balancing coefficient so its gradient is visible.
MOE = ModelConfig(name="moe-test", num_layers=2, hidden=32, ffn=32, num_heads=4, num_kv_heads=2, head_dim=8,
                  vocab_size=64, num_experts=4, top_k=2, aux_loss_coeff=0.1)


def moe_model(layers: int, **kw: object) -> ModelConfig:
    return MOE.replace(num_layers=layers, **kw)


def packed_documents() -> torch.Tensor:
    """(4, SEQ+1) document indices of four packed rows (tests.support.documents.STARTS4)."""
    return doc_ids(STARTS4, SEQ)


@functools.lru_cache(maxsize=None)
def reference(cfg: ModelConfig, rows: int, *, packed: bool = False) -> tuple[float, dict[str, torch.Tensor]]:
    """Loss and every gradient of the unsliced single-process model (float64) on tokens(rows, SEQ, seed=rows);
    ``packed``: the four rows as packed documents (packed_documents()). Read-only."""
    return reference_grads(cfg, tokens(rows, SEQ, seed=rows), seed=SEED,
                           documents=packed_documents() if packed else None)
