"""Cost-model sanity: per-slice causal attention, FLOP totals, Seq1F1B's partition, MFU numerator, GPUs."""

from __future__ import annotations

import json

import pytest

from slimpipe.config import MODEL_PRESETS, ConfigError, ParallelConfig
from slimpipe.schedule.actions import Kind
from slimpipe.sim import (
    AnalyticCost, Workload, layer_flops, load_hardware, seq1f1b_partition,
)

L70 = MODEL_PRESETS["llama-70b"]
MIX = MODEL_PRESETS["mixtral-8x7b"]


@pytest.mark.parametrize("model", [L70, MODEL_PRESETS["llama-13b"], MIX])
def test_slice_attention_is_j_plus_half_blocks(model) -> None:
    s, n = 131072, 16
    b = s / n
    per_block = 4 * model.q_dim * b * b  # QKᵀ + AV for one full (s/n)² block
    for j in range(n):
        assert layer_flops(model, b, j * b).attention == pytest.approx((j + 0.5) * per_block)
    total = sum(layer_flops(model, b, j * b).attention for j in range(n))
    assert total == pytest.approx(layer_flops(model, s, 0).attention)  # = unsliced causal 4·q·s²/2
    assert layer_flops(model, s, 0).attention == pytest.approx(2 * model.q_dim * s * s)


def test_linear_flops_are_equal_per_slice_and_match_parameter_count() -> None:
    s, n = 65536, 8
    lin = [layer_flops(L70, s / n, j * s / n).linear for j in range(n)]
    assert max(lin) == pytest.approx(min(lin))
    # Dense: 2 FLOPs per weight per token (norm weights aside).
    assert sum(lin) == pytest.approx(2 * s * (L70.layer_params() - 2 * L70.hidden))
    # MoE: top-2 of 8 experts plus the router.
    moe = layer_flops(MIX, 1, 0)
    assert moe.linear == pytest.approx(2 * (2 * 4096 * 4096 + 2 * 4096 * 1024) + 2 * 3 * 4096 * 14336 * 2
                                       + 2 * 4096 * 8)


def test_attention_dominates_at_512k() -> None:
    # Reference §7: ≈ 8.6 GFLOP attention vs ≈ 1.7 GFLOP linear per token per layer at 512K (≈ 83 %).
    fl = layer_flops(L70, 524288, 0)
    assert fl.attention / (fl.attention + fl.linear) == pytest.approx(0.83, abs=0.02)


def _cost(**kw) -> AnalyticCost:
    par = ParallelConfig(tp=kw.get("t", 4), cp=kw.get("c", 1), pp=kw.get("p", 4), slices=kw.get("n", 8),
                         vpp=kw.get("v", 1))
    wl = Workload(model=L70, parallel=par, seq_len=kw.get("s", 131072), global_batch=4,
                  recompute=kw.get("recompute", "none"), vocab_parallel=kw.get("vp", False))
    n = par.slices
    return AnalyticCost(wl, load_hardware("h800"), [1 / n] * n)


def test_analytic_durations_grow_with_slice_index_and_backward_costs_more() -> None:
    cost = _cost(t=1)  # no TP communication: compute only
    f = [cost.compute_time(Kind.F, 1, j) for j in range(8)]
    b = [cost.compute_time(Kind.B, 1, j) for j in range(8)]
    assert f == sorted(f) and f[0] < f[-1]
    assert all(bj > 2 * fj for fj, bj in zip(f, b))  # attention backward is 2.5× its forward
    assert cost.transfer_time(Kind.SEND_F, 0, 0) > 0


def test_recompute_adds_forward_work_to_backward_only() -> None:
    base, full = _cost(), _cost(recompute="full")
    fc1 = _cost(recompute="partial+fc1")
    for j in (0, 7):
        assert full.compute_time(Kind.F, 1, j) == base.compute_time(Kind.F, 1, j)
        b_none, b_fc1, b_full = (c.compute_time(Kind.B, 1, j) for c in (base, fc1, full))
        assert b_none < b_fc1 < b_full


def test_vocabulary_layers_move_with_vocab_parallel() -> None:
    ends, spread = _cost(), _cost(vp=True)
    last = 3  # p = 4, v = 1: every stage is both the first and the last virtual stage of its rank
    assert ends.compute_time(Kind.F, last, 0) > ends.compute_time(Kind.F, 1, 0)  # output layer on the last
    assert spread.compute_time(Kind.F, last, 0) == spread.compute_time(Kind.F, 1, 0)  # spread evenly
    inter = _cost(vp=True, v=2)  # the head runs in the VH collective on every rank (AnalyticCost.vocab_time), no stage
    assert inter.compute_time(Kind.F, 7, 0) == inter.compute_time(Kind.F, 1, 0)
    hw = load_hardware("h800")
    head = 2 * (131072 / 8) * 8192 * 128256 / 4 / 4 / (hw.peak_flops * hw.gemm_efficiency)  # 1/p of the GEMM
    assert inter.vocab_time(Kind.VH, 0)[0] == pytest.approx(3 * head)  # forward, dW and dX


def test_seq1f1b_partition_balances_forward_flops() -> None:
    s, k = 262144, 8
    weights = seq1f1b_partition(L70, s, k, multiple=8)
    assert sum(weights) == pytest.approx(1.0)
    lengths = [w * s for w in weights]
    assert all(x % 8 == 0 for x in lengths)
    assert lengths == sorted(lengths, reverse=True)  # early segments long, later ones short
    prefix, costs = 0.0, []
    for x in lengths:
        fl = layer_flops(L70, x, prefix)
        costs.append(fl.linear + fl.attention)
        prefix += x
    assert max(costs) / min(costs) < 1.01
    assert seq1f1b_partition(L70, s, 1) == (1.0,)


def test_flops_per_token_conventions() -> None:
    s = 65536
    n = L70.num_layers * L70.layer_params() + L70.vocab_size * L70.hidden + L70.hidden  # output counted once
    assert L70.flops_per_token(s, causal=False) == 6 * n + 12 * 80 * 64 * 128 * s
    assert L70.flops_per_token(s) == 6 * n + 6 * 80 * 64 * 128 * s  # executed: causal attention as run


@pytest.mark.parametrize("model", [L70, MIX, MODEL_PRESETS["tiny"]], ids=lambda m: m.name)
def test_executed_flops_equal_the_cost_models_work(model) -> None:
    """The MFU numerator is the work the cost model times: 3 × the forward FLOPs of every layer over the
    slices (causal prefix + diagonal) plus the output layer, per token, for any slicing; 6N also counts the
    RMSNorm weights (2h per layer + h), which do no matmul work."""
    s = 4096
    for n in (1, 4, 16):
        fwd = 0.0
        for j in range(n):
            fl = layer_flops(model, s / n, j * s / n)
            fwd += model.num_layers * (fl.linear + fl.attention)
        fwd += 2 * s * model.hidden * model.vocab_size  # output layer
        norms = 2 * model.hidden * model.num_layers + model.hidden
        assert 3 * fwd / s + 6 * norms == pytest.approx(model.flops_per_token(s), rel=1e-12)


def test_hardware_presets_and_json(tmp_path) -> None:
    assert load_hardware("h800").peak_flops == 989e12
    names = ("h100", "h800", "h200", "a100")
    assert tuple(load_hardware(x).name for x in names) == names
    path = tmp_path / "mygpu.json"
    path.write_text(json.dumps({"peak_flops": 5e14, "hbm_bytes": 6.4e10, "intra_node_bw": 1e11,
                                "inter_node_bw": 1e10}))
    hw = load_hardware(str(path))
    assert (hw.name, hw.peak_flops, hw.gpus_per_node) == ("mygpu", 5e14, 8)
    with pytest.raises(ConfigError, match="unknown"):
        load_hardware("b300")
    path.write_text(json.dumps({"peak_flops": 5e14, "hbm_bytes": 1, "intra_node_bw": 1, "inter_node_bw": 1,
                                "gemm_efficiency": 1.5}))
    with pytest.raises(ConfigError, match="gemm_efficiency"):
        load_hardware(str(path))


def _moe_cost(*, t: int, d: int, e: int, etp: int | None = None) -> AnalyticCost:
    par = ParallelConfig(tp=t, pp=4, dp=d, ep=e, etp=etp, slices=8)
    wl = Workload(model=MIX, parallel=par, seq_len=65536, global_batch=4 * d)
    return AnalyticCost(wl, load_hardware("h800"), [1 / 8] * 8)


def _ring(nbytes: float, group: int, bw: float, lat: float) -> float:
    return 0.0 if group == 1 else lat * (group - 1) + nbytes * (group - 1) / group / bw


@pytest.mark.parametrize("t, d, e, etp", [(4, 2, 1, None), (2, 4, 2, None), (2, 4, 4, 1), (1, 8, 8, None)])
def test_moe_communication_follows_megatrons_dispatchers(t, d, e, etp) -> None:
    hw = load_hardware("h800")
    cost = _moe_cost(t=t, d=d, e=e, etp=etp)
    tok, h, k, lat = 65536 / 8, 4096, 2, hw.p2p_latency_s
    attn, mlp, cp, ep = cost._layer_comm(0)
    assert attn == pytest.approx(_ring(tok * h * 2, t, hw.intra_node_bw, lat))
    expert_tp = t if etp is None else etp
    copies = 0 if expert_tp == 1 else (k if e > 1 else 1)  # e = 1: the dense MLP's gather/scatter
    assert mlp == pytest.approx(_ring(copies * tok * h * 2, expert_tp, hw.intra_node_bw, lat))
    a2a = 0.0 if e == 1 else 2 * (lat + tok / t * k * h * 2 * (e - 1) / e / hw.intra_node_bw)
    assert (cp, ep) == (0.0, pytest.approx(a2a))
    fwd, bwd = cost._comm_times(0)
    assert fwd == pytest.approx(2 * attn + 2 * mlp + ep) and bwd == pytest.approx(fwd)


@pytest.mark.parametrize("t, etp", [(1, None), (4, None), (4, 1)])
def test_per_gpu_linear_shapes_add_up_to_the_layer_flops(t, etp) -> None:
    from slimpipe.sim.flops import linear_shapes as _linear_shapes

    # Per all-gathered token, Σ 2·share·in·out over one GPU's GEMMs is the layer's linear FLOPs / t.
    for model in (L70, MIX):
        per_gpu = sum(2 * share * fin * fout for fin, fout, share in _linear_shapes(model, t, t if etp is None
                                                                                     else etp))
        assert per_gpu == pytest.approx(layer_flops(model, 1, 0).linear / t)


def test_expert_gradients_sync_over_the_expert_data_parallel_group() -> None:
    hw = load_hardware("h800")
    cost = _moe_cost(t=2, d=4, e=2)  # dense over d = 4, experts over t·d/(etp·e) = 2 replicas
    dense_layer = 2 * 4096 * 4096 + 2 * 4096 * 1024 + 4096 * 8 + 2 * 4096
    expert_layer = 3 * 4096 * 14336 * 8
    last = (8 * dense_layer + 128256 * 4096 + 4096) / 2  # last rank: 8 layers, norm, tied head, over t
    experts = 8 * expert_layer / (2 * 2)
    bw, lat = hw.link_bw(8), hw.p2p_latency_s
    want = _ring(last * 6, 4, bw, lat) + _ring(experts * 6, 2, bw, lat)
    assert cost.step_overhead() == pytest.approx(want, rel=1e-12)
