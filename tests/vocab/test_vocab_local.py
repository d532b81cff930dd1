"""Vocab-parallel gradients, losses, weights and memory on the in-process runtime (float64, RTOL 1e-10)."""

from __future__ import annotations

import pytest
import torch

from slimpipe.config import ConfigError
from slimpipe.models import LlamaParts
from slimpipe.runtime import LocalPipelineRuntime, OptimConfig, build_reference, reference_loss
from slimpipe.runtime.optim import build_optimizer
from slimpipe.schedule.actions import VOCAB_KINDS
from slimpipe.schedule.builders import build
from slimpipe.schedule.vocab import add_vocab_parallel
from tests.support.vocab import (
    RTOL, SEED, TINY, VOCAB, case_model, case_tokens, full_grads, max_rel_error, reference,
)

torch.set_num_threads(1)

# (builder, n, v, m per p) — slices or not, interleaved or not; m the fewest the default warm-up allows
FAMILIES = [("slimpipe", 4, 1, {2: 2, 4: 3}), ("slimpipe", 4, 2, {2: 2, 4: 2}),
            ("1f1b", 1, 1, {2: 3, 4: 4}), ("slimpipe", 1, 2, {2: 3, 4: 4})]
CASES = [(name, p, n, ms[p], v, tied)
         for name, n, v, ms in FAMILIES for p in (2, 4) for tied in (False, True)]


def _run(case, **kw):
    name, p, n, m, v, tied = case
    cfg, sched = case_model(name, p, n, m, v, tied)
    rt = LocalPipelineRuntime(cfg, sched, dtype=torch.float64, seed=SEED, vocab_parallel=True, **kw)
    return rt, rt.forward_backward(case_tokens(m), reduce_grads=True)


IDS = [f"{c[0]}-p{c[1]}n{c[2]}m{c[3]}v{c[4]}-{'tied' if c[5] else 'untied'}" for c in CASES]


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_gradients_equal_the_unsliced_reference(case) -> None:
    name, p, n, m, v, tied = case
    rt, res = _run(case)
    ref_loss, ref = reference(p * v, tied, m)
    assert abs(res.loss - ref_loss) <= RTOL * abs(ref_loss)
    grads = full_grads([{k: q.grad for k, q in rt.rank_parameters(r)} for r in range(p)])
    assert set(grads) == set(ref)
    err, worst = max_rel_error(grads, ref)
    assert err <= RTOL, f"{worst} off by {err:.3g}"
    executed = [e.action for e in sorted(res.trace, key=lambda e: (e.rank, e.start_s))]
    assert executed == [str(a) for prog in rt.schedule.ranks for a in prog]  # the executor follows the IR
    assert sum(a.kind in VOCAB_KINDS for a in rt.schedule.ranks[0]) == 3 * m * n


@pytest.mark.parametrize("v", [1, 2])
def test_together_with_the_attention_exchange(v: int) -> None:
    """Exchange markers are paired again after the collectives are placed; gradients stay exact."""
    case = ("slimpipe", 4, 8, 3 if v == 1 else 2, v, v == 2)
    rt, res = _run(case, attn_balance=100)
    assert any(a.kind.value.startswith("X") for a in rt.schedule.ranks[0])
    ref_loss, ref = reference(4 * v, v == 2, case[3])
    assert abs(res.loss - ref_loss) <= RTOL * abs(ref_loss)
    grads = full_grads([{k: q.grad for k, q in rt.rank_parameters(r)} for r in range(4)])
    err, worst = max_rel_error(grads, ref)
    assert err <= RTOL, f"{worst} off by {err:.3g}"


def test_train_steps_and_state_dicts_match_the_reference() -> None:
    """Two AdamW steps with clipping (tied, p 4, v 2): losses and updated weights equal a single-process
    run; model_state_dict gives full (V, h) tensors that load into a runtime without vocab parallelism."""
    optim = OptimConfig(lr=1e-2, weight_decay=0.1, clip=0.05)
    cfg, sched = case_model("slimpipe", 4, 4, 2, 2, True)
    rt = LocalPipelineRuntime(cfg, sched, dtype=torch.float64, seed=SEED, optim=optim, vocab_parallel=True)
    ref = build_reference(cfg, seed=SEED, dtype=torch.float64)
    opt = build_optimizer(ref.named_parameters(), optim)
    for step in range(2):
        toks = case_tokens(2 + step)[:2]
        res = rt.train_step(toks)
        opt.zero_grad()
        loss = reference_loss(ref, toks)
        loss.backward()
        norm = float(torch.nn.utils.clip_grad_norm_(ref.parameters(), optim.clip))
        opt.step()
        assert res.loss == pytest.approx(float(loss.detach()), rel=RTOL)
        assert res.grad_norm == pytest.approx(norm, rel=RTOL)
    state = rt.model_state_dict()
    assert state["embed.weight"].shape == (VOCAB, TINY.hidden)
    for name, p in ref.named_parameters():
        torch.testing.assert_close(state[name], p.detach(), rtol=RTOL, atol=1e-12, msg=name)
    plain = LocalPipelineRuntime(cfg, build("slimpipe", p=2, m=2, n=4, v=2), dtype=torch.float64, seed=1)
    plain.load_model_state_dict(state)
    for name, t in plain.model_state_dict().items():
        assert torch.equal(t, state[name]), name
    back = LocalPipelineRuntime(cfg, sched, dtype=torch.float64, seed=1, vocab_parallel=True)
    back.load_model_state_dict(plain.model_state_dict())
    assert all(torch.equal(t, state[k]) for k, t in back.model_state_dict().items())


def test_vocabulary_memory_moves_off_the_end_stages() -> None:
    """A vocabulary 8× the hidden size: without vocab parallelism rank 0 holds the embedding and the last
    rank the head plus the logits saved for backward; with it every rank holds V/p rows of both and no
    logits."""
    cfg = TINY.replace(num_layers=4, vocab_size=2048)
    sched = build("slimpipe", p=4, m=3, n=4)
    toks = torch.randint(0, 2048, (3, 65), generator=torch.Generator().manual_seed(0))
    params, saved = {}, {}
    for vp in (False, True):
        rt = LocalPipelineRuntime(cfg, sched, dtype=torch.float64, seed=SEED, vocab_parallel=vp)
        params[vp] = [sum(q.numel() for _, q in rt.rank_parameters(r)) for r in range(4)]
        saved[vp] = rt.forward_backward(toks).peak_saved_bytes
    layer, vh = cfg.layer_params(), 2048 * 32
    assert params[False] == [layer + vh, layer, layer, layer + 32 + vh]
    assert params[True] == [layer + 2 * vh // 4] * 3 + [layer + 2 * vh // 4 + 32]  # untied: 2 shards each
    # the last rank's n = 4 slices in flight each held (16, 2048) float64 logits for the loss's backward
    assert saved[False][3] - saved[True][3] >= 4 * 16 * 2048 * 8
    assert saved[True][:3] == saved[False][:3]  # elsewhere nothing changes: VE's sum is the stage input


def test_schedules_and_models_it_refuses() -> None:
    cfg, sched = case_model("slimpipe", 2, 4, 2, 1, False)
    with pytest.raises(ConfigError, match="vocab_parallel=False"):
        LocalPipelineRuntime(cfg, add_vocab_parallel(sched), dtype=torch.float64)

    class BiasedHead(LlamaParts):  # a head with a bias is not a plain vocabulary matrix: refused
        def head(self, tied):
            return torch.nn.Linear(self.hidden, self.vocab_size, bias=True)

    with pytest.raises(ConfigError, match="bias-free linear head"):
        LocalPipelineRuntime(BiasedHead(cfg), sched, dtype=torch.float64, vocab_parallel=True)
    LocalPipelineRuntime(BiasedHead(cfg), sched, dtype=torch.float64)  # fine without vocab parallelism
