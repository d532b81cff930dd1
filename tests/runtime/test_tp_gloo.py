"""Tensor + sequence parallelism on gloo: fp64 gradients of every shard against the unsliced single process.

One forked group per world size (2, 4, 8 ranks) runs every layout of that size (t ∈ {2, 4} with p and d),
each over many configurations (schedule, n, v, m, tied embeddings, vocabulary parallelism, attention
exchange). Every rank returns its loss, its gradients after the step's reductions (tied-embedding sum, TP
sum of replicated norm weights, DP all-reduce), its executed trace and its exchange counters; the parent
cuts the reference gradients the way the rank holds them (TP pieces along the split dimension, vocabulary
rows over t·p) and compares at 1e-10. A wrong shard, a missing TP/DP sum, a message carrying the wrong
token shard or a wrong vocabulary-parallel statistic all show up at ≥ 1e-3.
"""

from __future__ import annotations

import functools

import pytest
import torch

from tests.support.dist import run_dist
from tests.support.models import RTOL, reference_grads
from slimpipe.config import ModelConfig
from slimpipe.runtime import OptimConfig, ParallelState, PipelineRuntime, build_reference, reference_loss
from slimpipe.runtime.optim import build_optimizer
from slimpipe.runtime.vocab import vocab_rows
from slimpipe.schedule.builders import build

pytestmark = pytest.mark.dist
SEED = 11
SEQ = 32
# 8 query heads over 4 K/V heads (GQA), ffn 64, vocabulary 64: every size divides by t = 4.
TINY = ModelConfig(name="tp-test", num_layers=2, hidden=32, ffn=64, num_heads=8, num_kv_heads=4, head_dim=4,
                   vocab_size=64)


@functools.cache
def _case(name: str, n: int, m: int, v: int, tied: bool, vocab: int, p: int):
    """(model, compute-only schedule): one layer per stage, two when p·v = 1."""
    cfg = TINY.replace(num_layers=max(2, p * v), tie_embeddings=tied, vocab_size=vocab)
    weights = (0.5, 0.25, 0.125, 0.125) if name == "seq1f1b" else None
    return cfg, build(name, p=p, m=m, n=n, v=v, slice_weights=weights)


# (schedule, n, m, v, tied, vocab_parallel, attn_balance, V[, recompute]) per layout (t, p, d)
C = tuple
GRID: dict[tuple[int, int, int], list[C]] = {
    (2, 1, 1): [("slimpipe", 4, 2, 1, False, False, 0, 64), ("slimpipe", 2, 1, 2, True, False, 0, 64),
                ("gpipe", 2, 2, 1, False, True, 0, 62), ("1f1b", 1, 2, 1, True, True, 0, 64),
                ("seq1f1b", 4, 2, 1, False, False, 0, 64), ("slimpipe", 4, 2, 1, True, False, 0, 64, "full")],
    (2, 2, 1): [("slimpipe", 4, 2, 1, False, False, 0, 64), ("slimpipe", 4, 2, 2, True, False, 0, 64),
                ("interleaved-1f1b", 1, 4, 2, False, False, 0, 64), ("slimpipe", 8, 2, 1, False, False, 100, 64),
                ("slimpipe", 4, 3, 2, True, False, 100, 64), ("slimpipe", 4, 2, 1, False, True, 0, 62),
                ("slimpipe", 4, 2, 2, True, True, 0, 64), ("seq1f1b", 4, 2, 1, False, False, 0, 64),
                ("slimpipe", 4, 2, 1, True, True, 100, 64), ("gpipe", 2, 2, 2, False, False, 0, 64),
                ("slimpipe", 4, 2, 2, False, False, 0, 64, "partial+fc1"),
                ("slimpipe", 4, 3, 1, False, False, 100, 64, "full")],
    (4, 1, 1): [("slimpipe", 2, 2, 1, False, False, 0, 64), ("1f1b", 1, 2, 1, True, False, 0, 64),
                ("slimpipe", 4, 1, 2, False, True, 0, 64), ("gpipe", 2, 2, 1, True, True, 0, 62)],
    (2, 4, 1): [("slimpipe", 4, 3, 1, False, False, 0, 64), ("slimpipe", 8, 2, 2, True, False, 0, 64),
                ("slimpipe", 4, 3, 1, False, False, 100, 64), ("slimpipe", 8, 2, 1, False, True, 100, 62),
                ("interleaved-1f1b", 1, 4, 2, False, False, 0, 64), ("slimpipe", 2, 4, 1, True, True, 0, 64),
                ("seq1f1b", 4, 2, 1, False, False, 0, 64), ("1f1b", 1, 4, 1, True, False, 0, 64),
                ("slimpipe", 4, 2, 2, False, True, 100, 64)],
    (4, 2, 1): [("slimpipe", 4, 2, 1, False, False, 0, 64), ("slimpipe", 2, 2, 2, True, False, 0, 64),
                ("slimpipe", 4, 2, 1, False, False, 100, 64), ("slimpipe", 4, 2, 1, False, True, 0, 64),
                ("1f1b", 1, 2, 1, True, True, 0, 64), ("interleaved-1f1b", 1, 2, 2, False, False, 0, 64)],
    (2, 2, 2): [("slimpipe", 4, 2, 1, False, False, 0, 64), ("slimpipe", 4, 2, 2, True, True, 0, 64),
                ("slimpipe", 8, 2, 1, False, False, 100, 64), ("1f1b", 1, 2, 1, True, False, 0, 64)],
    (4, 1, 2): [("slimpipe", 2, 2, 1, False, False, 0, 64), ("slimpipe", 2, 1, 2, True, True, 0, 64),
                ("gpipe", 2, 2, 1, False, False, 0, 64)],
    (2, 1, 4): [("slimpipe", 4, 1, 1, False, False, 0, 64), ("1f1b", 1, 1, 1, True, True, 0, 64)],
}
WORLDS = {2: [(2, 1, 1)], 4: [(2, 2, 1), (4, 1, 1)], 8: [(2, 4, 1), (4, 2, 1), (2, 2, 2), (4, 1, 2), (2, 1, 4)]}


def _tokens(rows: int, vocab: int, salt: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1000 * salt + rows + vocab)
    return torch.randint(0, vocab, (rows, SEQ + 1), generator=gen)


def _worker(rank: int, world: int, layouts: list) -> dict:
    out = {}
    for t, p, d in layouts:
        state = ParallelState.create(pp=p, tp=t, dp=d, timeout_s=60.0)
        for case in GRID[(t, p, d)]:
            name, n, m, v, tied, vp, xb, vocab, *recompute = case
            cfg, sched = _case(name, n, m, v, tied, vocab, p)
            rt = PipelineRuntime(cfg, sched, state, dtype=torch.float64, seed=SEED, vocab_parallel=vp,
                                 attn_balance=xb, recompute=(recompute or ["none"])[0])
            toks = _tokens(m * d, vocab)[state.dp_rank * m : (state.dp_rank + 1) * m]
            res = rt.forward_backward(toks, reduce_grads=True)
            ex = rt.executor.exchange
            out[((t, p, d), case)] = (
                (state.pp_rank, state.tp_rank), res.loss, {k: q.grad.clone() for k, q in rt.named_parameters()},
                [e.action for e in res.trace], [str(a) for a in rt.schedule.ranks[state.pp_rank]],
                0 if ex is None else ex.sent + ex.served)
    return out


@functools.cache
def _reference(case: C, p: int, d: int):
    name, n, m, v, tied, _, _, vocab, *_ = case
    cfg, _ = _case(name, n, m, v, tied, vocab, p)
    return reference_grads(cfg, _tokens(m * d, vocab), seed=SEED)


def _piece(name: str, ref: torch.Tensor, *, t: int, p: int, pp_rank: int, tp_rank: int, vp: bool,
           cfg: ModelConfig) -> torch.Tensor:
    """The part of the full reference gradient this rank holds."""
    if vp and name in ("embed.weight", "head.weight"):  # vocabulary rows over t·p, padded with zeros
        rows = vocab_rows(cfg.vocab_size, t * p)
        lo = (pp_rank * t + tp_rank) * rows
        piece = ref.new_zeros(rows, ref.size(1))
        valid = max(0, min(rows, cfg.vocab_size - lo))
        piece[:valid] = ref[lo : lo + valid]
        return piece
    dims = {"wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "wo": 1, "w2": 1}
    leaf = name.split(".")[-2]
    dim = 0 if name in ("embed.weight", "head.weight") else dims.get(leaf)
    if dim is None:
        return ref  # replicated (norm weights)
    size = ref.size(dim) // t
    return ref.narrow(dim, tp_rank * size, size)


def _check(results: list[dict], layouts: list) -> int:
    checked = 0
    for layout in layouts:
        t, p, d = layout
        for case in GRID[layout]:
            name, n, m, v, tied, vp, xb, vocab, *_ = case
            cfg, sched = _case(name, n, m, v, tied, vocab, p)
            ref_loss, ref = _reference(case, p, d)
            names, exchanged = set(), 0
            for out in results:
                (pp_rank, tp_rank), loss, grads, trace, program, moved = out[(layout, case)]
                assert abs(loss - ref_loss) <= RTOL * abs(ref_loss), (layout, case, loss, ref_loss)
                for k, g in grads.items():
                    r = _piece(k, ref[k], t=t, p=p, pp_rank=pp_rank, tp_rank=tp_rank, vp=vp, cfg=cfg)
                    err = float((g - r).abs().max() / r.abs().max().clamp_min(1e-300))
                    assert err <= RTOL, f"{layout} {case} rank ({pp_rank}, {tp_rank}): {k} off by {err:.3g}"
                assert trace == program, (layout, case)
                names |= set(grads)
                exchanged += moved
            assert names == set(ref), (layout, case)
            assert (exchanged > 0) == (xb > 0), (layout, case, exchanged)
            checked += 1
    return checked


@pytest.mark.timeout(240)
@pytest.mark.parametrize("world", [2, 4, 8])
def test_tp_gradients(world: int) -> None:
    assert _check(run_dist(_worker, world, WORLDS[world], timeout_s=200.0), WORLDS[world]) == sum(
        len(GRID[lay]) for lay in WORLDS[world])


def test_grid_covers_the_issue() -> None:
    """≥ 40 configurations, t ∈ {2, 4}, crossed with p, d, n, v, schedule, vocab-parallel and exchange."""
    cases = [(lay, c) for lay, cs in GRID.items() for c in cs]
    assert len(cases) >= 40
    assert {lay[0] for lay, _ in cases} == {2, 4} and {lay[1] for lay, _ in cases} >= {1, 2, 4}
    assert {lay[2] for lay, _ in cases} >= {1, 2, 4}
    for t in (2, 4):
        mine = [c for lay, c in cases if lay[0] == t]
        assert {c[0] for c in mine} >= {"slimpipe", "1f1b", "gpipe", "interleaved-1f1b"}
        assert {c[1] for c in mine} >= {1, 2, 4} and {c[3] for c in mine} == {1, 2}
        assert any(c[5] for c in mine) and any(c[6] for c in mine) and any(c[4] for c in mine)
    assert {c[8] for _, c in cases if len(c) > 8} == {"full", "partial+fc1"}  # recompute replays TP too


OPTIM = OptimConfig(lr=1e-2, weight_decay=0.1, clip=0.05)  # clip below the norm: clipping is active
TRAIN = [("slimpipe", 4, 2, 2, True, False, 0, 64), ("slimpipe", 4, 2, 1, False, True, 0, 62)]


def _train_worker(rank: int, world: int) -> list:
    state = ParallelState.create(pp=2, tp=2, dp=world // 4, timeout_s=60.0)
    out = []
    for case in TRAIN:
        name, n, m, v, tied, vp, xb, vocab = case
        cfg, sched = _case(name, n, m, v, tied, vocab, 2)
        rt = PipelineRuntime(cfg, sched, state, dtype=torch.float64, seed=SEED, optim=OPTIM, vocab_parallel=vp)
        norms, losses = [], []
        for step in range(2):
            toks = _tokens(m * state.dp, vocab, step)[state.dp_rank * m : (state.dp_rank + 1) * m]
            res = rt.train_step(toks)
            norms.append(res.grad_norm)
            losses.append(res.loss)
        full = rt.model_state_dict()
        out.append((norms, losses, {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).clone()
                                    for k, v in full.items()}))
    return out


@pytest.mark.timeout(120)
def test_train_steps_match_single_process_adamw() -> None:
    """Two train steps at t2 p2 d2 (tied) and t2 p2 d2 with vocabulary parallelism: losses, clipped grad
    norm (every shard once, norm weights once) and the updated full weights equal one-process AdamW with
    clip_grad_norm_ on the whole global batch."""
    results = run_dist(_train_worker, 8)
    for i, case in enumerate(TRAIN):
        name, n, m, v, tied, vp, xb, vocab = case
        cfg, _ = _case(name, n, m, v, tied, vocab, 2)
        ref = build_reference(cfg, seed=SEED, dtype=torch.float64)
        opt = build_optimizer(ref.named_parameters(), OPTIM)
        ref_norms, ref_losses = [], []
        for step in range(2):
            opt.zero_grad()
            loss = reference_loss(ref, _tokens(2 * m, vocab, step))
            loss.backward()
            ref_norms.append(float(torch.nn.utils.clip_grad_norm_(ref.parameters(), OPTIM.clip)))
            opt.step()
            ref_losses.append(float(loss.detach()))
        want = dict(ref.named_parameters())
        for out in results:
            norms, losses, params = out[i]
            assert norms == pytest.approx(ref_norms, rel=RTOL) and losses == pytest.approx(ref_losses, rel=RTOL)
            for k, val in params.items():
                torch.testing.assert_close(val, want[k].detach(), rtol=RTOL, atol=1e-12)


RESHARD = [(2, 2), (1, 4), (4, 1)]  # (t, p): saved at t2·p2, resumed at each


def _reshard_worker(rank: int, world: int, root: str) -> dict:
    """Per vocab_parallel: train one step at t2·p2 and save; then, for every (t, p), load that checkpoint
    into a fresh runtime (another seed: nothing survives but the checkpoint) and run the next step."""
    from pathlib import Path

    from slimpipe.train.checkpoint import load_checkpoint, save_checkpoint

    states = {(t, p): ParallelState.create(pp=p, tp=t, timeout_s=60.0) for t, p in RESHARD}
    out = {}
    for vp in (False, True):
        cfg = TINY.replace(num_layers=4, vocab_size=62 if vp else 64)
        where = Path(root) / ("vp" if vp else "tp")
        out[vp] = []
        for i, (t, p) in enumerate(RESHARD):
            rt = PipelineRuntime(cfg, build("slimpipe", p=p, m=4, n=4), states[(t, p)], dtype=torch.float32,
                                 seed=SEED + i, optim=OPTIM, vocab_parallel=vp)
            if i == 0:
                rt.train_step(_tokens(4, cfg.vocab_size, 1))
                save_checkpoint(rt, str(where), 1, {"step": 1}, rank=rank, keep=0)
            else:
                assert load_checkpoint(rt, where / "step_000001") == 1
            out[vp].append(rt.train_step(_tokens(4, cfg.vocab_size, 2)).loss)
    return out


@pytest.mark.timeout(120)
def test_checkpoint_reshards_across_t(tmp_path) -> None:
    """A t2·p2 checkpoint (DCP, global names, TP pieces as DTensors; with and without vocabulary
    parallelism) resumes at t1·p4 and t4·p1 with the next step's loss equal to the t2·p2 run that went on,
    within 1e-6 (fp32)."""
    import torch.distributed.checkpoint  # noqa: F401 - imported once here, not in every forked child

    for out in run_dist(_reshard_worker, 4, str(tmp_path)):
        for vp, (go_on, t1p4, t4p1) in out.items():
            assert t1p4 == pytest.approx(go_on, rel=1e-6) and t4p1 == pytest.approx(go_on, rel=1e-6), vp
