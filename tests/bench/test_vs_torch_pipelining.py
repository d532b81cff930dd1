"""Smoke run of bench/vs_torch_pipelining.py's core: torch.distributed.pipelining vs slimpipe, 2 gloo ranks.

A tiny model and short sequences, one round: the numbers that do not depend on timing are checked
exactly. Every configuration's first-step loss equals the unpipelined reference's (same weights, same
tokens: a wrong stage split on torch's side or a wrong K/V carry on ours shows up at ≥ 1e-3), torch's
1F1B and slimpipe's 1f1b see the same rank-0 peak activation bytes (same schedule, same model, the same
accounting), and slicing lowers slimpipe's peak.
"""

from __future__ import annotations


import pytest
import torch

from slimpipe.runtime import build_reference, reference_loss

MODEL = "tiny:num_layers=4,hidden=32,ffn=64,num_heads=4,num_kv_heads=2,head_dim=8,vocab_size=64"
ONLY = ("torch-1f1b", "torch-interleaved-1f1b", "torch-interleaved-zb", "slimpipe-1f1b", "slimpipe-n4-v1",
        "slimpipe-n2-v2")


def _load():
    """The bench script and its support module (imported here: torch.distributed.pipelining is slow)."""
    import bench.peer_bench_support
    import bench.vs_torch_pipelining

    return bench.vs_torch_pipelining, bench.peer_bench_support


@pytest.mark.dist
@pytest.mark.timeout(120)
def test_compare_smoke() -> None:
    torch.set_num_threads(1)  # forked children inherit OpenMP state (platform §6)
    bench, support = _load()
    opts = support.BenchOptions(seq_len=32, microbatches=2, model=MODEL, steps=1, reps=1, slices=(2, 4),
                                only=ONLY, timeout_s=60.0)
    result = bench.compare(opts)
    rows = {r["name"]: r for r in result["rows"]}
    assert list(rows) == list(ONLY)

    cfg = support.parse_model(MODEL)
    ref = float(reference_loss(build_reference(cfg, seed=opts.seed), support.batch(cfg, opts, 0)).detach())
    for name, r in rows.items():
        assert r["first_loss"] == pytest.approx(ref, rel=support.LOSS_RTOL), name
        assert r["loss_ok"], name
        assert r["step_s"] > 0 and len(r["step_s_all"]) == 1, name
        assert all(b > 0 for b in r["busy_s"]) and all(c > 0 for c in r["compute_cpu_s"]), name

    torch_1f1b = rows["torch-1f1b"]["rank0_peak_activation_bytes"]
    assert rows["slimpipe-1f1b"]["rank0_peak_activation_bytes"] == torch_1f1b
    assert rows["slimpipe-n4-v1"]["rank0_peak_activation_bytes"] < 0.9 * torch_1f1b
    assert rows["torch-1f1b"]["step_ratio"] == 1.0 and rows["torch-1f1b"]["memory_ratio"] == 1.0
    assert "| slimpipe-n4-v1 |" in support.table(result)


def test_replay_projects_the_1f1b_bubble() -> None:
    """p = 2, m = 2, F = 1 s, B = 2 s per stage: 1F1B takes 3·(F + B) = 9 s; sliced in two halves with
    slimpipe's order it takes 7.5 s (the bubble shrinks to one half-slice forward and backward)."""
    _, support = _load()

    def events(program: dict[int, list[tuple[str, float]]]) -> list[tuple[int, str, float, float, float]]:
        return [(rank, name, float(i), float(i), cost) for rank, acts in program.items()
                for i, (name, cost) in enumerate(acts)]

    one_f_one_b = {0: [("0F0", 1), ("0F1", 1), ("0B0", 2), ("0B1", 2)],
                   1: [("1F0", 1), ("1B0", 2), ("1F1", 1), ("1B1", 2)]}
    assert support.replay(events(one_f_one_b), 2) == pytest.approx(9.0)
    sliced = {0: [("0F0.0", .5), ("0F0.1", .5), ("0F1.0", .5), ("0B0.1", 1), ("0F1.1", .5), ("0B0.0", 1),
                  ("0B1.1", 1), ("0B1.0", 1)],
              1: [("1F0.0", .5), ("1F0.1", .5), ("1B0.1", 1), ("1F1.0", .5), ("1B0.0", 1), ("1F1.1", .5),
                  ("1B1.1", 1), ("1B1.0", 1)]}
    assert support.replay(events(sliced), 2) == pytest.approx(7.5)
    with pytest.raises(RuntimeError, match="stuck"):  # rank 0 waits for a backward that never comes first
        support.replay(events({0: [("0B0", 1)], 1: [("1F0", 1), ("1B0", 1)]}), 2)
