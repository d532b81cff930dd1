"""Models: global names, layout-independent initial weights, and the user-model contract."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.support.models import RTOL, max_rel_error, model, tokens
from slimpipe.config import ConfigError
from slimpipe.runtime import LocalPipelineRuntime, build_reference, reference_loss, stages_of_rank
from slimpipe.schedule.builders import build


@pytest.mark.timeout(30)
@pytest.mark.parametrize("p, v, tied", [(1, 1, False), (2, 2, False), (4, 2, True), (8, 1, True)])
def test_layouts_share_names_and_initial_weights(p: int, v: int, tied: bool) -> None:
    cfg = model(8, tie_embeddings=tied)
    ref = dict(build_reference(cfg, seed=7).named_parameters())
    n = 2 if p <= 4 else 1
    rt = LocalPipelineRuntime(cfg, build("gpipe", p=p, m=1, n=n, v=v), seed=7)
    seen = {}
    for r in range(p):
        for name, param in rt.rank_parameters(r):
            assert torch.equal(param, ref[name]), name  # replicas (tied embed) included
            seen[name] = param
    assert set(seen) == set(ref)
    assert ("head.weight" in ref) != tied
    assert {"embed.weight", "norm.weight", "layers.7.attn.wq.weight", "layers.0.mlp.w2.weight"} <= set(ref)
    other = dict(build_reference(cfg, seed=8).named_parameters())
    assert not torch.equal(other["layers.3.attn.wk.weight"], ref["layers.3.attn.wk.weight"])


@pytest.mark.timeout(30)
def test_megatron_stage_mapping() -> None:
    # p=2, v=2, L=8: stage s = k·p + r holds layers [2s, 2s+2)
    assert [st.layers for st in stages_of_rank(8, 2, 2, 0)] == [(0, 1), (4, 5)]
    assert [st.layers for st in stages_of_rank(8, 2, 2, 1)] == [(2, 3), (6, 7)]
    assert stages_of_rank(8, 2, 2, 1)[1].last and stages_of_rank(8, 2, 2, 0)[0].first
    with pytest.raises(ConfigError, match="not divisible by p·v"):
        stages_of_rank(6, 2, 2, 0)


@pytest.mark.timeout(30)
def test_moe_blocks_name_experts_globally() -> None:
    names = dict(build_reference(model(2, num_experts=4, top_k=2), seed=1).named_parameters())
    assert {"layers.1.mlp.router.weight", "layers.1.mlp.experts.3.w2.weight"} <= set(names)
    assert "layers.1.mlp.w1.weight" not in names


# ---- the user-model contract (the same decoder is shown in docs/runtime.md) ------------------------------
class NoPEBlock(nn.Module):
    """A GPT-style block without positional encoding (causal attention alone orders tokens)."""

    def __init__(self, h: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(h), nn.LayerNorm(h)
        self.qkv, self.proj = nn.Linear(h, 3 * h), nn.Linear(h, h)
        self.mlp = nn.Sequential(nn.Linear(h, 4 * h), nn.GELU(), nn.Linear(4 * h, h))

    def forward(self, x, ctx):
        b, t, h = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, h // self.heads).unbind(2)
        x = x + self.proj(ctx.attend(q, k, v).reshape(b, t, h))  # ctx adds earlier slices' K/V
        return x + self.mlp(self.ln2(x))


class TinyGPT:
    """DecoderParts: embedding, blocks, final norm, head."""

    def __init__(self, layers=4, hidden=32, heads=4, vocab=64):
        self.num_layers, self.hidden, self.vocab_size, self.heads = layers, hidden, vocab, heads
        self.tie_embeddings = True

    def embedding(self):
        return nn.Embedding(self.vocab_size, self.hidden)

    def block(self, index):
        return NoPEBlock(self.hidden, self.heads)

    def final_norm(self):
        return nn.LayerNorm(self.hidden)

    def head(self, tied):
        return _TiedHead(tied)

    def init_parameter(self, name, param, generator):
        if "ln" in name or name.startswith("norm."):
            param.fill_(1.0 if name.endswith("weight") else 0.0)
        elif name.endswith("bias"):
            param.zero_()
        else:
            param.normal_(0.0, 0.05, generator=generator)


class _TiedHead(nn.Module):
    def __init__(self, embed):
        super().__init__()
        self._embed = [embed]  # not registered: the weight belongs to ``embed``

    def forward(self, x):
        return x @ self._embed[0].weight.t()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name, p, n, m, v", [("slimpipe", 2, 4, 2, 2), ("seq1f1b", 4, 8, 2, 1)])
def test_user_decoder_pipelines_exactly(name: str, p: int, n: int, m: int, v: int) -> None:
    parts = TinyGPT(layers=2 * p * v)
    ref = build_reference(parts, seed=1, dtype=torch.float64)
    toks = tokens(m)
    loss = reference_loss(ref, toks)
    loss.backward()
    rt = LocalPipelineRuntime(parts, build(name, p=p, m=m, n=n, v=v), dtype=torch.float64, seed=1)
    res = rt.forward_backward(toks, reduce_grads=True)
    assert res.loss == pytest.approx(float(loss.detach()), rel=RTOL)
    grads = {k: q.grad for r in range(p) for k, q in rt.rank_parameters(r)}
    err, worst = max_rel_error(grads, {k: q.grad for k, q in ref.named_parameters()})
    assert err <= RTOL, (worst, err)
