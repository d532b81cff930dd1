"""Context parallelism end to end on gloo: fp64 gradients equal the unsliced single-process model's.

Each test forks one process group (world ≤ 8) and runs many configurations in it; every rank returns its
loss, its gradients after the dp·cp all-reduce, its executed trace and what the exchange moved, and the
parent compares them with the unsliced reference on the whole global batch (float64: the layouts differ
only by summation order, ~1e-15 relative; a missing dK/dV term, a wrong RoPE position or a mis-normalised
loss shows up at ≥ 1e-3).
"""

from __future__ import annotations

import functools

import pytest
import torch

from slimpipe.config import ConfigError, ModelConfig
from slimpipe.runtime import ParallelState, PipelineRuntime, build_reference, reference_loss
from slimpipe.runtime.forked import run_forked
from slimpipe.schedule.builders import build

pytestmark = [pytest.mark.dist, pytest.mark.timeout(180)]

SEED, SEQ, VOCAB, RTOL = 3, 32, 61, 1e-10
TINY = ModelConfig(name="cp-test", num_layers=2, hidden=32, ffn=64, num_heads=4, num_kv_heads=2, head_dim=8,
                   vocab_size=VOCAB)


@functools.lru_cache(maxsize=None)
def _case(name: str, p: int, n: int, m: int, v: int, tied: bool):
    return TINY.replace(num_layers=p * v * (2 if p * v < 2 else 1), tie_embeddings=tied), build(
        name, p=p, m=m, n=n, v=v)


def _tokens(rows: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (rows, SEQ + 1), generator=torch.Generator().manual_seed(rows))


def _worker(rank: int, world: int, pp: int, cp: int, cases: list) -> dict:
    state = ParallelState.create(pp=pp, cp=cp, timeout_s=60.0)
    out = {}
    for case in cases:
        name, p, n, m, v, tied, balance, vocab, recompute = case
        cfg, sched = _case(name, p, n, m, v, tied)
        rt = PipelineRuntime(cfg, sched, state, dtype=torch.float64, seed=SEED, attn_balance=balance,
                             vocab_parallel=vocab, recompute=recompute)
        toks = _tokens(m * state.dp)[state.dp_rank * m: (state.dp_rank + 1) * m]
        res = rt.forward_backward(toks, reduce_grads=True)
        ex = rt.executor
        moved = 0 if ex.exchange is None else ex.exchange.sent + ex.exchange.served
        program = [str(a) for a in rt.schedule.ranks[state.pp_rank]]
        out[case] = dict(coords=(state.dp_rank, state.cp_rank, state.pp_rank), loss=res.loss,
                         grads={k: q.grad.clone() for k, q in rt.named_parameters()},
                         trace_ok=[e.action for e in res.trace] == program, moved=moved,
                         cp_bytes=ex.cp.comm.sent_bytes if ex.cp is not None else 0)
    return out


@functools.lru_cache(maxsize=None)
def _reference(case, dp: int) -> tuple[float, dict[str, torch.Tensor]]:
    name, p, n, m, v, tied = case[:6]
    ref = build_reference(_case(name, p, n, m, v, tied)[0], seed=SEED, dtype=torch.float64)
    loss = reference_loss(ref, _tokens(m * dp))
    loss.backward()
    return float(loss.detach()), {k: q.grad.clone() for k, q in ref.named_parameters()}


def _full(per_pp: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Gradients of one pipeline's ranks (pp order) → one dict; vocabulary shards concatenated, unpadded."""
    out: dict[str, torch.Tensor] = {}
    for name in {k for g in per_pp for k in g}:
        parts = [g[name] for g in per_pp if name in g]
        out[name] = torch.cat(parts)[:VOCAB] if name in ("embed.weight", "head.weight") and len(parts) > 1 \
            else parts[0]
    return out


def _check(results: list[dict], cases: list, dp: int) -> None:
    for case in cases:
        ref_loss, ref = _reference(case, dp)
        rows = [r[case] for r in results]
        assert all(abs(r["loss"] - ref_loss) <= RTOL * abs(ref_loss) for r in rows), (case, ref_loss)
        assert all(r["trace_ok"] for r in rows), f"{case}: a trace differs from its program"
        assert all(r["cp_bytes"] > 0 for r in rows), f"{case}: no CP traffic"
        if case[6]:
            assert sum(r["moved"] for r in rows) > 0, f"{case}: the exchange moved nothing"
        pipelines: dict[tuple[int, int], list] = {}
        for r in sorted(rows, key=lambda r: r["coords"]):
            pipelines.setdefault(r["coords"][:2], []).append(r["grads"])
        for coords, per_pp in pipelines.items():  # every (dp, cp) pipeline holds the full gradient
            grads = _full(per_pp)
            assert set(grads) == set(ref), case
            for k, g in grads.items():
                err = float((g - ref[k]).abs().max() / ref[k].abs().max().clamp_min(1e-300))
                assert err <= RTOL, f"{case} pipeline {coords}: {k} off by {err:.3g}"


# (builder, p, n, m, v, tied, attention-exchange threshold, vocab-parallel, recompute)
C2_P2 = [
    ("slimpipe", 2, 2, 2, 1, False, 0, False, "none"), ("slimpipe", 2, 4, 2, 2, False, 0, False, "none"),
    ("slimpipe", 2, 4, 3, 1, True, 0, False, "none"), ("1f1b", 2, 1, 3, 1, False, 0, False, "none"),
    ("interleaved-1f1b", 2, 1, 4, 2, False, 0, False, "none"), ("gpipe", 2, 2, 2, 1, False, 0, False, "none"),
    ("seq1f1b", 2, 4, 2, 1, False, 0, False, "none"), ("slimpipe", 2, 8, 2, 1, False, 100, False, "none"),
    ("slimpipe", 2, 4, 2, 2, False, 1, False, "none"), ("slimpipe", 2, 4, 2, 1, True, 0, True, "none"),
    ("slimpipe", 2, 8, 2, 1, True, 100, True, "none"), ("slimpipe", 2, 4, 2, 1, False, 100, False, "full"),
    ("slimpipe", 2, 4, 2, 2, False, 0, False, "partial+fc1"),
]
C4_P1 = [
    ("slimpipe", 1, 2, 1, 1, False, 0, False, "none"), ("slimpipe", 1, 4, 2, 2, True, 0, False, "none"),
    ("1f1b", 1, 1, 2, 1, False, 0, False, "none"), ("slimpipe", 1, 4, 2, 1, False, 0, False, "full"),
    ("slimpipe", 1, 2, 2, 1, False, 0, False, "partial"),
]
C4_P2 = [
    ("slimpipe", 2, 2, 2, 1, False, 0, False, "none"), ("slimpipe", 2, 4, 2, 2, True, 0, False, "none"),
    ("slimpipe", 2, 4, 2, 1, False, 100, False, "none"), ("slimpipe", 2, 4, 2, 1, True, 100, True, "none"),
]
C2_P2_D2 = [
    ("slimpipe", 2, 4, 2, 2, True, 0, False, "none"), ("1f1b", 2, 1, 2, 1, False, 0, False, "none"),
    ("slimpipe", 2, 8, 2, 1, False, 100, True, "none"),
]
C2_P1_D2 = [("slimpipe", 1, 4, 2, 1, False, 0, False, "none"), ("gpipe", 1, 2, 1, 1, True, 0, False, "none")]


def test_c2_p2() -> None:
    _check(run_forked(_worker, 4, 2, 2, C2_P2, timeout_s=60), C2_P2, dp=1)


def test_c4_p1_and_c2_p1_d2() -> None:
    _check(run_forked(_worker, 4, 1, 4, C4_P1, timeout_s=60), C4_P1, dp=1)
    _check(run_forked(_worker, 4, 1, 2, C2_P1_D2, timeout_s=60), C2_P1_D2, dp=2)


def test_world8_c4_p2_and_c2_p2_d2() -> None:
    _check(run_forked(_worker, 8, 2, 4, C4_P2, timeout_s=60), C4_P2, dp=1)
    _check(run_forked(_worker, 8, 2, 2, C2_P2_D2, timeout_s=60), C2_P2_D2, dp=2)


def _bad_seq(rank: int, world: int) -> None:
    state = ParallelState.create(pp=1, cp=2, timeout_s=30.0)
    cfg, sched = _case("slimpipe", 1, 4, 1, 1, False)
    PipelineRuntime(cfg, sched, state, dtype=torch.float64).forward_backward(torch.zeros(1, 25, dtype=torch.long))


def test_sequence_not_divisible_names_the_fix() -> None:
    with pytest.raises(Exception, match=r"--seq-len=24 is not a multiple of n=4 · 2c=4 = 16.*nearest: 32"):
        run_dist(_bad_seq, 2)
    assert "--slices 3" in sequence_problem(60, 4, 1, 2)  # 60 = 3 · 2c·… : the nearest slice count that works
    assert "--cp=4 needs at least 8 tokens" in sequence_problem(6, 1, 1, 4)
    assert "n=2 · 2c=4 · t=2 = 16" in sequence_problem(40, 2, 2, 2)
    with pytest.raises(ConfigError):
        raise ConfigError(sequence_problem(60, 4, 1, 2))
