"""Vocab-parallel on real processes (gloo, forked, one thread each): gradients (also with the attention
exchange), AdamW steps with DP, and DCP checkpoints that reshard from pp 4 (vocab-parallel) to pp 2 with
and without it."""

from __future__ import annotations

import pytest
import torch

from slimpipe.runtime import OptimConfig, ParallelState, PipelineRuntime
from slimpipe.schedule.builders import build
from tests.support.vocab import (
    RTOL, SEED, TINY, case_model, case_tokens, full_grads, max_rel_error, reference, run_dist,
)

pytestmark = [pytest.mark.dist, pytest.mark.timeout(120)]

# (builder, p, n, m, v, tied, attention-exchange threshold)
PP4 = [("slimpipe", 4, 4, 2, 2, True, 0), ("1f1b", 4, 1, 4, 1, False, 0), ("slimpipe", 4, 4, 3, 1, False, 0),
       ("slimpipe", 4, 8, 3, 1, True, 100)]
OPTIM = OptimConfig(lr=1e-2, weight_decay=0.1, clip=0.05)


def _grads_worker(rank: int, world: int, cases: list) -> dict:
    state = ParallelState.create(pp=4, dp=1, timeout_s=60.0)
    out = {}
    for case in cases:
        name, p, n, m, v, tied, balance = case
        cfg, sched = case_model(name, p, n, m, v, tied)
        rt = PipelineRuntime(cfg, sched, state, dtype=torch.float64, seed=SEED, vocab_parallel=True,
                             attn_balance=balance)
        res = rt.forward_backward(case_tokens(m), reduce_grads=True)
        program = [str(a) for a in rt.schedule.ranks[state.pp_rank]]
        out[case] = (res.loss, {k: q.grad.clone() for k, q in rt.named_parameters()},
                     [e.action for e in res.trace] == program)
    return out


def test_pp4_gradients() -> None:
    results = run_dist(_grads_worker, 4, PP4)
    for case in PP4:
        name, p, n, m, v, tied, _ = case
        ref_loss, ref = reference(p * v, tied, m)
        assert all(abs(r[case][0] - ref_loss) <= RTOL * abs(ref_loss) for r in results), case
        assert all(r[case][2] for r in results), f"{case}: a trace differs from its program"
        err, worst = max_rel_error(full_grads([r[case][1] for r in results]), ref)
        assert err <= RTOL, f"{case}: {worst} off by {err:.3g}"


def _train_worker(rank: int, world: int) -> tuple[int, list[float], dict]:
    """pp 2 × dp 2, tied, two AdamW steps on halves of a 4-sequence global batch."""
    state = ParallelState.create(pp=2, dp=2, timeout_s=60.0)
    cfg, sched = case_model("slimpipe", 2, 4, 2, 1, True)
    rt = PipelineRuntime(cfg, sched, state, dtype=torch.float64, seed=SEED, optim=OPTIM, vocab_parallel=True)
    losses = []
    for step in range(2):
        toks = case_tokens(4 + step)[:4][state.dp_rank * 2 : state.dp_rank * 2 + 2]
        losses.append(rt.train_step(toks).loss)
    return state.pp_rank, losses, rt.model_state_dict()


def test_pp2_dp2_train_steps() -> None:
    from slimpipe.runtime import build_reference, reference_loss
    from slimpipe.runtime.optim import build_optimizer

    cfg, _ = case_model("slimpipe", 2, 4, 2, 1, True)
    ref = build_reference(cfg, seed=SEED, dtype=torch.float64)
    opt = build_optimizer(ref.named_parameters(), OPTIM)
    ref_losses = []
    for step in range(2):
        opt.zero_grad()
        loss = reference_loss(ref, case_tokens(4 + step)[:4])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), OPTIM.clip)
        opt.step()
        ref_losses.append(float(loss.detach()))
    for _, losses, state in run_dist(_train_worker, 4):
        assert losses == pytest.approx(ref_losses, rel=RTOL)
        for name, p in ref.named_parameters():
            if name in state:
                torch.testing.assert_close(state[name], p.detach(), rtol=RTOL, atol=1e-12, msg=name)


def _save_worker(rank: int, world: int, root: str) -> tuple[float, dict]:
    from slimpipe.train.checkpoint import save_checkpoint

    state = ParallelState.create(pp=4, dp=1, timeout_s=60.0)
    cfg, sched = case_model("slimpipe", 4, 4, 3, 1, False)
    rt = PipelineRuntime(cfg, sched, state, dtype=torch.float64, seed=SEED, optim=OPTIM, vocab_parallel=True)
    rt.train_step(case_tokens(3))
    save_checkpoint(rt, root, 1, {"step": 1}, rank=rank, keep=0)
    loss = rt.train_step(case_tokens(5)[:3]).loss
    return loss, rt.model_state_dict()


def _load_worker(rank: int, world: int, step_dir: str, vocab_parallel: bool) -> tuple[int, float, dict]:
    from pathlib import Path

    from slimpipe.train.checkpoint import load_checkpoint

    state = ParallelState.create(pp=2, dp=1, timeout_s=60.0)
    cfg = TINY.replace(num_layers=4)
    rt = PipelineRuntime(cfg, build("slimpipe", p=2, m=3, n=4), state, dtype=torch.float64, seed=SEED + 1,
                         optim=OPTIM, vocab_parallel=vocab_parallel)
    step = load_checkpoint(rt, Path(step_dir))
    loss = rt.train_step(case_tokens(5)[:3]).loss
    return step, loss, rt.model_state_dict()


def test_checkpoint_reshards_pp4_to_pp2(tmp_path) -> None:
    """Save after one step on pp 4 (vocab-parallel), load on pp 2 with and without it: the next step's loss
    and the weights after it equal those of the pp 4 run that went on (same AdamW moments, float64)."""
    import torch.distributed.checkpoint  # noqa: F401 - imported once here, not in every forked child

    saved = run_dist(_save_worker, 4, str(tmp_path))
    loss4, state4 = saved[0][0], {k: t for _, st in saved for k, t in st.items()}
    for vp in (True, False):
        for step, loss2, state2 in run_dist(_load_worker, 2, str(tmp_path / "step_000001"), vp):
            assert step == 1
            assert loss2 == pytest.approx(loss4, rel=RTOL)
            for name, t in state2.items():
                torch.testing.assert_close(t, state4[name], rtol=RTOL, atol=1e-12, msg=f"vp={vp} {name}")
