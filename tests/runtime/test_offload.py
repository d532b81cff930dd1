"""Activation offload on CPU: tested by its accounting (the host is the device here).

Every saved storage of an offloaded unit really leaves autograd's hands (a handle stays, the bytes go to a
separate host tensor) and comes back through a reusable buffer, so gradients must be bitwise those of the
run without offload; per unit ≈ α of the saved bytes move, units whose backward follows too soon stay, and
every restore is issued one compute action ahead, in backward order, through two buffers.
"""

from __future__ import annotations

import pytest
import torch

from tests.support.dist import run_dist
from tests.support.models import model, tokens
from slimpipe.config import ConfigError
from slimpipe.runtime import LocalPipelineRuntime, ParallelState, PipelineRuntime
from slimpipe.runtime.offload import OffloadConfig, offload_gaps
from slimpipe.schedule.builders import build
from slimpipe.schedule.passes import lower

SEED = 2


def _run(sched, alpha: float, mode: str = "none", **kw):
    rt = LocalPipelineRuntime(model(4), sched, dtype=torch.float64, seed=SEED, recompute=mode,
                              offload=OffloadConfig(ratio=alpha, min_bytes=0), **kw)
    res = rt.forward_backward(tokens(sched.num_microbatches))
    grads = [[q.grad.clone() for _, q in rt.rank_parameters(r)] for r in range(sched.num_ranks)]
    return res, grads, rt


def _bitwise(a, b) -> bool:
    return all(torch.equal(x, y) for ra, rb in zip(a, b) for x, y in zip(ra, rb))


@pytest.mark.timeout(90)
@pytest.mark.parametrize("mode, kw", [("none", {}), ("full", {}), ("partial+fc1", {"attn_balance": 100}),
                                      ("none", {"vocab_parallel": True})], ids=["none", "full", "fc1-xchg", "vocab"])
def test_offload_is_bitwise_and_accounted(mode: str, kw: dict) -> None:
    sched = build("slimpipe", p=2, m=3, n=4)
    base, g0, _ = _run(sched, 0.0, mode, **kw)
    for alpha in (0.3, 0.7):
        res, grads, rt = _run(sched, alpha, mode, **kw)
        assert res.loss == base.loss and _bitwise(grads, g0), (mode, alpha)
        for r, ex in enumerate(rt.executors):
            off = ex.offload
            gaps = offload_gaps(rt.schedule.ranks[r])
            assert set(off.per_unit) == set(gaps)  # every forward unit went through the hooks
            moved = [u for u, (_, o) in off.per_unit.items() if o]
            for u, (saved, o) in off.per_unit.items():
                if gaps[u] < 2:
                    assert o == 0, (u, gaps[u])  # its backward follows too soon to hide the copies
            assert moved, f"rank {r}: nothing offloaded"
            total_saved = sum(off.per_unit[u][0] for u in moved)
            frac = sum(off.per_unit[u][1] for u in moved) / total_saved
            if mode != "full":  # full keeps two storages per unit and layer: α is met only coarsely
                assert abs(frac - alpha) < 0.1, (r, frac, alpha)
            # restores: in backward order, each issued one compute action ahead, two buffers reused
            order = [u for u in off.backward_order if u in moved]
            assert [u for u, _ in off.restores] == order and all(ahead for _, ahead in off.restores)
            assert len(off.buffers) == 2
            assert res.peak_offloaded_bytes[r] > 0
        assert res.peak_saved_bytes[0] < base.peak_saved_bytes[0]  # resident saved bytes went down


@pytest.mark.timeout(30)
def test_gap_rule_on_a_known_program() -> None:
    """p=4, n=8, m=2 slimpipe: rank 0 holds every unit for ≥ 6 actions; the last rank backwards each
    micro-batch's last slice right after its forward (nothing to hide a copy behind)."""
    sched = lower(build("slimpipe", p=4, m=2, n=8))
    first, last = offload_gaps(sched.ranks[0]), offload_gaps(sched.ranks[3])
    assert first[(0, 0, 7)] == 6 and min(first.values()) == 6  # F1.0 … F1.5 run between F0.7 and B0.7
    assert last[(3, 0, 7)] == 0 and last[(3, 1, 7)] == 0
    assert last[(3, 0, 6)] == 3  # F0.6 | F0.7 B0.7 F1.0 | B0.6


@pytest.mark.timeout(30)
def test_offload_config_rejects_bad_ratio() -> None:
    with pytest.raises(ConfigError, match=r"\[0, 1\)"):
        OffloadConfig(ratio=1.0)


def _gloo_worker(rank: int, world: int) -> dict:
    state = ParallelState.create(pp=world, dp=1, timeout_s=60.0)
    sched = build("slimpipe", p=2, m=3, n=4)
    out = {}
    for alpha, mode in ((0.0, "none"), (0.6, "none"), (0.6, "full")):
        rt = PipelineRuntime(model(4), sched, state, dtype=torch.float64, seed=SEED, recompute=mode,
                             attn_balance=100, offload=OffloadConfig(ratio=alpha, min_bytes=0))
        res = rt.forward_backward(tokens(3))
        out[(alpha, mode)] = (res.loss, [q.grad.clone() for _, q in rt.named_parameters()],
                              res.peak_offloaded_bytes)
    return out


@pytest.mark.dist
@pytest.mark.timeout(120)
def test_offload_on_gloo_with_the_exchange() -> None:
    for res in run_dist(_gloo_worker, 2):
        loss0, g0, _ = res[(0.0, "none")]
        for key in ((0.6, "none"), (0.6, "full")):
            loss, grads, off = res[key]
            assert loss == loss0 and all(off), key
            if key[1] == "none":
                assert all(torch.equal(a, b) for a, b in zip(grads, g0)), key
            else:  # full recompute: the replay's attention trades with the backward partner (same volume)
                for a, b in zip(grads, g0):
                    torch.testing.assert_close(a, b, rtol=1e-10, atol=0)
