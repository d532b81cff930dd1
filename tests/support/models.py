"""Tiny models, token batches and the unsliced single-process reference the runtime is checked against."""

from __future__ import annotations

import functools

import torch

from slimpipe.config import ModelConfig
from slimpipe.runtime import build_reference, reference_loss

__all__ = ["TINY", "SEQ", "RTOL", "model", "tokens", "reference_grads", "unsliced_reference",
           "max_rel_error"]

# h 32, 4 query heads over 2 K/V heads (GQA), byte-free vocab 64: seconds for the whole grid on one core.
TINY = ModelConfig(name="test", num_layers=2, hidden=32, ffn=64, num_heads=4, num_kv_heads=2, head_dim=8,
                   vocab_size=64)
SEQ = 32
# float64 sliced vs unsliced differ only by summation order (~1e-15 relative); 1e-10 leaves a wide margin
# while any missing dK/dV term or mis-normalised loss shows up at ≥ 1e-3.
RTOL = 1e-10


def model(layers: int, **kw: object) -> ModelConfig:
    return TINY.replace(num_layers=layers, **kw)


def tokens(rows: int, seq: int = SEQ, *, vocab: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (rows, seq + 1), generator=torch.Generator().manual_seed(seed))


def reference_grads(cfg: ModelConfig, toks: torch.Tensor, *, seed: int,
                    documents: torch.Tensor | None = None) -> tuple[float, dict[str, torch.Tensor]]:
    """Loss and every gradient of the unsliced, unpipelined model on the whole global batch (float64);
    ``documents``: packed documents (reference_loss's dense document-causal mask)."""
    ref = build_reference(cfg, seed=seed, dtype=torch.float64)
    loss = reference_loss(ref, toks, documents=documents)
    loss.backward()
    return float(loss.detach()), {n: p.grad.clone() for n, p in ref.named_parameters()}


@functools.cache
def unsliced_reference(cfg: ModelConfig, rows: int, *, seq: int = SEQ, vocab: int = 64, token_seed: int,
                       seed: int) -> tuple[float, dict[str, torch.Tensor]]:
    """reference_grads(cfg, tokens(rows, seq, vocab=vocab, seed=token_seed), seed=seed), computed once per
    test session: every test module asking for the same model and batch shares it. Read-only."""
    return reference_grads(cfg, tokens(rows, seq, vocab=vocab, seed=token_seed), seed=seed)


def max_rel_error(grads: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> tuple[float, str]:
    """max over parameters of max|g − g_ref| / max|g_ref|, and the worst parameter's name."""
    worst, name = 0.0, ""
    for n, g in grads.items():
        r = ref[n]
        err = float((g - r).abs().max() / r.abs().max().clamp_min(1e-300))
        if err > worst:
            worst, name = err, n
    return worst, name
