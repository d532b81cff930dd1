"""Activation recompute: gradients equal the plain run, bytes equal the memory model, replays never write K/V.

Every mode (partial, partial+fc1, full) must give the loss and every gradient of the same run without
recompute (float64, RTOL: a replay recomputes the same values, so only summation order could differ); the
saved bytes per slice-layer must equal slimpipe.sim.memory's per-mode figure (scaled to the dtype) within
5 %; and a replayed forward must read its K/V window from the store without writing it.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn

from tests.support.dist import run_dist
from tests.support.models import RTOL, max_rel_error, model, reference_grads, tokens
from slimpipe.config import ConfigError, ParallelConfig
from slimpipe.runtime import LocalPipelineRuntime, ParallelState, PipelineError, PipelineRuntime
from slimpipe.runtime.exchange import with_exchange
from slimpipe.runtime.kv import SliceKV
from slimpipe.schedule.builders import build
from slimpipe.schedule.exchange import exchanges
from slimpipe.sim import Workload
from slimpipe.sim.memory import activation_bytes_per_token

MODES = ("partial", "partial+fc1", "full")
SEED = 5
# (builder, p, n, m, v, attn_balance, vocab_parallel, slice weights)
CASES = [
    ("slimpipe", 2, 4, 2, 1, 0, False, None),
    ("slimpipe", 2, 4, 2, 2, 0, False, None),
    ("1f1b", 2, 1, 2, 1, 0, False, None),
    ("seq1f1b", 2, 4, 2, 1, 0, False, (0.4, 0.3, 0.2, 0.1)),
    ("slimpipe", 2, 4, 2, 1, 100, False, None),  # exchange: owners compute moved blocks in-process
    ("slimpipe", 2, 4, 2, 1, 0, True, None),  # vocabulary parallelism
]


def _grads(rt: LocalPipelineRuntime) -> list[dict[str, torch.Tensor]]:
    return [{n: q.grad.clone() for n, q in rt.rank_parameters(r)} for r in range(rt.schedule.num_ranks)]


def _run(case, mode: str) -> tuple[float, list[dict[str, torch.Tensor]], LocalPipelineRuntime]:
    name, p, n, m, v, balance, vocab, weights = case
    cfg = model(2 * p * v)
    sched = build(name, p=p, m=m, n=n, v=v, slice_weights=weights)
    rt = LocalPipelineRuntime(cfg, sched, dtype=torch.float64, seed=SEED, attn_balance=balance,
                              vocab_parallel=vocab, recompute=mode)
    res = rt.forward_backward(tokens(m, seed=m), reduce_grads=True)
    return res.loss, _grads(rt), rt


def _expected_writes(rt: LocalPipelineRuntime) -> list[int]:
    """K/V writes of a step: one per forward unit and layer of the rank, none by replays."""
    s = rt.schedule
    per_stage = rt.parts.num_layers // (s.num_ranks * s.virtual_stages)
    return [sum(1 for a in prog if a.kind.value == "F") * per_stage for prog in s.ranks]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-p{c[1]}n{c[2]}v{c[4]}-x{c[5]}-vp{int(c[6])}")
def test_modes_equal_plain_run(case) -> None:
    loss0, grads0, _ = _run(case, "none")
    for mode in MODES:
        loss, grads, rt = _run(case, mode)
        assert abs(loss - loss0) <= RTOL * abs(loss0), (mode, loss, loss0)
        for r, (g, g0) in enumerate(zip(grads, grads0)):
            err, worst = max_rel_error(g, g0)
            assert err <= RTOL, f"{mode} rank {r}: {worst} off by {err:.3g}"
        assert [ex.store.writes for ex in rt.executors] == _expected_writes(rt), mode


@pytest.mark.timeout(60)
def test_replay_never_writes_the_store_and_the_check_can_fail(monkeypatch) -> None:
    """Full recompute replays attention in every backward: the store sees exactly one write per forward
    unit and layer, and its blocks are the very tensors the forward stored. Negative control: with the
    replay left unmarked a replay tries to write its block again, and the store refuses."""
    case = CASES[0]
    _, _, rt = _run(case, "full")
    assert [ex.store.writes for ex in rt.executors] == _expected_writes(rt)
    monkeypatch.setattr(SliceKV, "_replay", lambda self: contextlib.nullcontext())
    with pytest.raises(PipelineError, match="the store holds"):
        _run(case, "full")


H, F, HEADS, KV_HEADS, HEAD_DIM = 64, 128, 4, 2, 16


@pytest.mark.timeout(60)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_saved_bytes_per_slice_layer_equal_the_memory_model(dtype) -> None:
    """Per token and layer (two depths differenced, so embedding, head and per-slice RoPE tables cancel):
    saved + K/V equals the model's ``a`` (full: saved equals ``a`` = 2h bytes, K/V the kv_cache term
    4·d_kv), the model's bf16 bytes scaled to the dtype, within 5 % (the rest is fp32 rstd and lse)."""
    seq, elem = 64, torch.finfo(dtype).bits // 8
    for mode in ("none",) + MODES:
        per = {}
        for layers in (2, 4):
            cfg = model(layers, hidden=H, ffn=F, num_heads=HEADS, num_kv_heads=KV_HEADS, head_dim=HEAD_DIM)
            rt = LocalPipelineRuntime(cfg, build("slimpipe", p=1, m=1, n=1), dtype=dtype, recompute=mode)
            res = rt.forward_backward(tokens(1, seq))
            per[layers] = (res.peak_saved_bytes[0], res.peak_kv_bytes[0])
        saved, kv = ((per[4][i] - per[2][i]) / (2 * seq) for i in range(2))
        work = Workload(model=cfg, parallel=ParallelConfig(), seq_len=seq, global_batch=1, recompute=mode)
        a = activation_bytes_per_token(work)[0] * elem / 2
        kv_model = 4 * cfg.kv_dim * elem / 2
        assert kv == kv_model, (mode, kv, kv_model)
        measured = saved if mode == "full" else saved + kv
        assert abs(measured / a - 1) <= 0.05, (mode, dtype, measured, a)


class _PlainBlock(nn.Module):  # a user block without partial regions: full works, partial modes refuse
    def __init__(self, h: int) -> None:
        super().__init__()
        self.qkv, self.proj = nn.Linear(h, 3 * h), nn.Linear(h, h)

    def forward(self, x, ctx):
        b, t, h = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, 2, h // 2).unbind(2)
        return x + self.proj(ctx.attend(q, k, v).reshape(b, t, h))


class _Parts:
    num_layers, hidden, vocab_size, tie_embeddings = 2, 16, 32, False

    def embedding(self):
        return nn.Embedding(self.vocab_size, self.hidden)

    def block(self, index):
        return _PlainBlock(self.hidden)

    def final_norm(self):
        return nn.LayerNorm(self.hidden)

    def head(self, tied):
        return nn.Linear(self.hidden, self.vocab_size, bias=False)

    def init_parameter(self, name, param, generator):
        param.normal_(0.0, 0.1, generator=generator)


@pytest.mark.timeout(60)
def test_user_blocks_run_full_and_refuse_partial_modes() -> None:
    sched = build("slimpipe", p=2, m=2, n=2)
    toks = tokens(2, 16, vocab=32)
    plain = LocalPipelineRuntime(_Parts(), sched, dtype=torch.float64)
    full = LocalPipelineRuntime(_Parts(), sched, dtype=torch.float64, recompute="full")
    assert plain.forward_backward(toks).loss == full.forward_backward(toks).loss
    for (n, g), (_, g_full) in zip(plain.named_parameters(), full.named_parameters()):
        torch.testing.assert_close(g_full.grad, g.grad, rtol=RTOL, atol=0, msg=n)
    with pytest.raises(ConfigError, match="partial.*implements"):
        LocalPipelineRuntime(_Parts(), sched, recompute="partial")
    with pytest.raises(ConfigError, match="unknown"):
        LocalPipelineRuntime(_Parts(), sched, recompute="selective")


# ---- gloo: the exchange's helper really computes, the replay trades with the backward partner ------------
GLOO = [(2, 4, 1, 2, "full", 100, False), (2, 8, 1, 2, "full", 100, False), (2, 4, 2, 2, "partial+fc1", 100, False),
        (2, 4, 1, 2, "full", 0, True)]


def _gloo_case(case):
    p, n, v, m, _, _, _ = case
    return model(2 * p * v), build("slimpipe", p=p, m=m, n=n, v=v)


def _gloo_worker(rank: int, world: int, cases: list) -> dict:
    state = ParallelState.create(pp=world, dp=1, timeout_s=60.0)
    out = {}
    for case in cases:
        cfg, sched = _gloo_case(case)
        _, _, _, m, mode, balance, vocab = case
        rt = PipelineRuntime(cfg, sched, state, dtype=torch.float64, seed=SEED, attn_balance=balance,
                             vocab_parallel=vocab, recompute=mode)
        res = rt.forward_backward(tokens(m, seed=m), reduce_grads=True)
        ex = rt.executor.exchange
        out[case] = (res.loss, {n: q.grad.clone() for n, q in rt.named_parameters()},
                     (ex.sent, ex.served) if ex is not None else (0, 0), rt.executor.store.writes)
    return out


@pytest.mark.dist
@pytest.mark.timeout(180)
def test_recompute_on_gloo_with_exchange_and_vocab_parallel() -> None:
    results = run_dist(_gloo_worker, 2, GLOO)
    for case in GLOO:
        cfg, sched = _gloo_case(case)
        ref_loss, ref = reference_grads(cfg, tokens(case[3], seed=case[3]), seed=SEED)
        for rank, res in enumerate(results):
            loss, grads, _, writes = res[case]
            assert abs(loss - ref_loss) <= RTOL * abs(ref_loss), (case, loss, ref_loss)
            if case[6]:  # vocab parallel: shards are checked by the vocab tests; the blocks here
                grads = {k: g for k, g in grads.items() if k.startswith("layers.")}
            err, worst = max_rel_error(grads, ref)
            assert err <= RTOL, f"{case} rank {rank}: {worst} off by {err:.3g}"
            forwards = sum(1 for a in sched.ranks[rank] if a.kind.value == "F")
            assert writes == forwards * cfg.num_layers // (case[0] * case[2])
        if case[5]:  # every block handed over was served; full: each backward block traded twice
            per_stage = cfg.num_layers // (case[0] * case[2])
            expected = [0, 0]
            for x in exchanges(with_exchange(sched, case[5])):
                replays = 2 if x.owner.kind.value == "B" and case[4] == "full" else 1
                expected[x.owner_rank] += per_stage * replays
            (sent0, served0), (sent1, served1) = results[0][case][2], results[1][case][2]
            assert [sent0, sent1] == expected and sent0 == served1 and sent1 == served0, case
