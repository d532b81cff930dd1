"""Loaded Hugging Face Llama checkpoints against transformers itself: logits, loss and every gradient,
unsliced and pipelined with slices (float32 ≤ 1e-5 relative, float64 ≤ 1e-10)."""

from __future__ import annotations

import pytest
import torch

import tests.support.hf as hs
from slimpipe.hf.config import hf_name, open_checkpoint
from slimpipe.hf.weights import load_hf_weights, load_rank, rank_needs
from slimpipe.runtime import LocalPipelineRuntime, build_reference
from slimpipe.runtime.stage import reference_logits
from slimpipe.schedule.builders import build

# float32: HF computes RoPE angles in fp32, slimpipe in fp64 then rounds; both sum in another order.
FP32 = 1e-5
# float64 (with the oracle's RoPE in fp64): only summation order differs, ~1e-15; a wrong term is ≥ 1e-3.
FP64 = 1e-10


def _reference(path, dtype):
    ckpt = open_checkpoint(path)
    ref = build_reference(ckpt.model, seed=123, dtype=dtype)
    load_rank(ckpt, ref, rank_needs(ref, None))
    return ckpt, ref


@pytest.mark.timeout(120)
@pytest.mark.parametrize("which", ["llama3", "tied"])
def test_fp32_logits_match_transformers(assets, which):
    ckpt, ref = _reference(assets[which], torch.float32)
    assert ckpt.model.tie_embeddings == (which == "tied")
    assert (ckpt.model.rope_scaling is not None) == (which == "llama3")
    ids = torch.randint(0, hs.VOCAB, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert hs.rel(reference_logits(ref, ids), hs.oracle(assets[which])(ids).logits) < FP32


@pytest.mark.timeout(180)
def test_fp64_logits_loss_and_pipelined_gradients(assets):
    """Unsliced logits, then loss and every gradient of pipelined runs with slices (p2 n4; vocab-parallel
    interleaved p2 v2 n4) against transformers' backward; evaluate() equals the same loss."""
    path = assets["tied"]
    model = hs.oracle(path, torch.float64)
    tokens = torch.randint(0, hs.VOCAB, (2, 33), generator=torch.Generator().manual_seed(1))
    ckpt, ref = _reference(path, torch.float64)
    with torch.no_grad():
        assert hs.rel(reference_logits(ref, tokens[:, :-1]), model(tokens[:, :-1]).logits) < FP64
    out = hs.hf_loss(model, tokens)
    out.backward()
    loss = out.item()
    want = {n: p.grad for n, p in model.named_parameters()}
    for sched, vocab in ((build("slimpipe", p=2, m=2, n=4), False), (build("slimpipe", p=2, m=2, n=4, v=2), True)):
        rt = LocalPipelineRuntime(ckpt.model, sched, dtype=torch.float64, seed=7, vocab_parallel=vocab)
        load_hf_weights(rt, ckpt)
        res = rt.forward_backward(tokens, reduce_grads=True)
        assert abs(res.loss - loss) / loss < FP64
        got = rt.model_state_dict()  # parameter values; gradients below, by rank
        assert hs.rel(got["embed.weight"], model.model.embed_tokens.weight) == 0.0
        for r, (m, _) in enumerate(rt.rank_models()):
            for name, p in m.named_parameters():
                g = p.grad if not vocab or name != "embed.weight" else None
                if g is not None:
                    assert hs.rel(g, want[hf_name(name)]) < FP64, (r, name)
        assert abs(rt.evaluate(tokens).loss - loss) / loss < FP64
