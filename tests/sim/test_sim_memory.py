"""Memory-model spot checks against the reference's worked examples (§6.4) and the published formulas.

Expected values are computed here from the formulas of §6 written out independently (not from the model's
own helpers), so a wrong helper fails.
"""

from __future__ import annotations

import pytest

from slimpipe.config import MODEL_PRESETS, ParallelConfig
from slimpipe.schedule.builders import build
from slimpipe.sim import Workload, memory_model, peak_inflight

GIB = 2**30
L70 = MODEL_PRESETS["llama-70b"]


def wl(model=L70, *, s, B, t=1, c=1, p=1, d=1, n=1, v=1, e=1, etp=None, recompute="partial+fc1", offload=0.0,
       vp=False):
    par = ParallelConfig(tp=t, cp=c, pp=p, dp=d, slices=n, vpp=v, ep=e, etp=etp)
    return Workload(model=model, parallel=par, seq_len=s, global_batch=B, recompute=recompute,
                    offload=offload, vocab_parallel=vp)


def test_worked_example_a() -> None:
    w = wl(s=524288, B=8, t=4, c=2, p=16, n=16, v=5, vp=True)
    top = memory_model(w, build("slimpipe", p=16, m=8, n=16, v=5))[0]
    a1 = 69632 * 524288 / 8 * 5  # A1 = a · s/(t·c) · L/p
    assert top.activations == pytest.approx(a1 * (1 + 30 / 80))
    assert top.activations / GIB == pytest.approx(29.22, abs=0.005)
    assert top.output / GIB == pytest.approx(524288 * 128256 * 4 / 128 / GIB)
    assert top.recomputed == pytest.approx(524288 / 32 * 6 * 28672 / 4)
    assert top.kv_grad / GIB == pytest.approx(2 * 30 / 16)  # KVfull = 2 GiB, g = n = 16


def test_worked_example_b_megatron_interleaved() -> None:
    w = wl(s=65536, B=64, t=8, p=8, d=2, v=10)
    mem = memory_model(w, build("interleaved-1f1b", p=8, m=32, v=10))
    a1 = 69632 * 65536 / 8 * 10
    assert mem[0].activations == pytest.approx(a1 * (8 + 7 / 10))
    assert mem[0].output == 0 and mem[0].kv_grad == 0
    p_layer = 2 * 8192**2 + 2 * 8192 * 1024 + 3 * 8192 * 28672 + 2 * 8192
    assert mem[0].params_grads == pytest.approx(6 * (10 * p_layer + 128256 * 8192) / 8)
    assert mem[0].optimizer == pytest.approx(12 * (10 * p_layer + 128256 * 8192) / (8 * 2))


@pytest.mark.parametrize(("name", "n", "v", "warmup", "factor"), [
    ("slimpipe", 8, 2, "double", lambda p, n, v: 1 + 2 * (p - 1) / (n * v)),
    ("slimpipe", 8, 2, "single", lambda p, n, v: 1 + (p - 1) / (n * v)),
    ("slimpipe", 8, 1, "auto", lambda p, n, v: 1 + 2 * (p - 1) / n),  # auto = double for n > 1
    ("slimpipe", 8, 1, "single", lambda p, n, v: 1 + (p - 1) / n),
    ("interleaved-1f1b", 1, 2, "auto", lambda p, n, v: p + (p - 1) / v),
    ("1f1b", 1, 1, "auto", lambda p, n, v: p),
    ("seq1f1b", 8, 1, "auto", lambda p, n, v: (p + n - 1) / n),
])
def test_rank0_activation_factor_comes_from_the_schedule(name, n, v, warmup, factor) -> None:
    p, m = 4, 8
    w = wl(MODEL_PRESETS["llama-7b"], s=32768, B=m, p=p, n=n, v=v, recompute="none")
    sched = build(name, p=p, m=m, n=n, v=v, warmup=warmup)
    a1 = (12 * 4096 + 4 * 4096 + 6 * 11008) * 32768 * 32 / p  # MHA 7B, no recompute
    assert memory_model(w, sched)[0].activations == pytest.approx(a1 * factor(p, n, v))


def test_full_recompute_keeps_kv_cache_of_inflight_units() -> None:
    p, n, v, s = 4, 8, 2, 65536
    w = wl(s=s, B=4, t=8, p=p, n=n, v=v, recompute="full", vp=True)
    top = memory_model(w, build("slimpipe", p=p, m=4, n=n, v=v))[0]
    factor = 1 + 2 * (p - 1) / (n * v)
    assert top.activations == pytest.approx(2 * 8192 * s / 8 * 80 / p * factor)
    assert top.kv_cache == pytest.approx(4 * 1024 * s / 8 * 80 / p * factor)
    assert top.recomputed == pytest.approx((10 * 8192 + 6 * 28672) * s / (n * 8))
    unsliced = memory_model(wl(s=s, B=4, t=8, p=p, v=v, recompute="full"),
                            build("interleaved-1f1b", p=p, m=4, v=v))
    assert unsliced[0].kv_cache == 0.0  # n = 1: K/V are recomputed with the layer


def test_offload_splits_activation_and_never_moves_kv_cache() -> None:
    base = dict(s=131072, B=4, t=8, p=4, n=8, v=2, vp=True)
    sched = build("slimpipe", p=4, m=4, n=8, v=2)
    for mode in ("partial+fc1", "full"):
        full = memory_model(wl(**base, recompute=mode), sched)[0]
        off = memory_model(wl(**base, recompute=mode, offload=0.75), sched)[0]
        assert off.activations == pytest.approx(0.25 * full.activations)
        assert off.offloaded == pytest.approx(0.75 * full.activations)
        assert off.kv_cache == full.kv_cache
        assert off.peak == pytest.approx(full.peak - 0.75 * full.activations)


def test_output_term_placement() -> None:
    s, t, c, p = 65536, 4, 2, 4
    sched = build("slimpipe", p=p, m=4, n=8)
    vocab_pp = memory_model(wl(s=s, B=4, t=t, c=c, p=p, n=8, vp=True), sched)
    assert all(mb.output == pytest.approx(s * 128256 * 4 / (c * t * p)) for mb in vocab_pp)
    ends = memory_model(wl(s=s, B=4, t=t, c=c, p=p, n=8), sched)
    assert [mb.output for mb in ends[:-1]] == [0.0] * (p - 1)
    assert ends[-1].output == pytest.approx(s * 128256 * 4 / (c * t))
    # Megatron n = 1 rows carry no output term (fused per-micro-batch loss).
    assert memory_model(wl(s=s, B=4, t=t, c=c, p=p), build("1f1b", p=p, m=4))[-1].output == 0.0


def test_megatron_end_stages_hold_the_vocabulary() -> None:
    w = wl(s=8192, B=8, t=2, p=4, recompute="none")
    mem = memory_model(w, build("1f1b", p=4, m=8))
    vh = 128256 * 8192 / 2
    assert mem[0].params_grads - mem[1].params_grads == pytest.approx(6 * vh)
    assert mem[3].params_grads - mem[1].params_grads == pytest.approx(6 * (vh + 8192 / 2))


@pytest.mark.parametrize("t, d, e, etp", [(2, 4, 8, 1), (2, 8, 8, None), (8, 4, 1, None), (8, 4, 1, 1),
                                           (4, 4, 2, None)])
def test_moe_weights_and_optimizer_sharding(t, d, e, etp) -> None:
    # Experts over expert-TP × e (expert-TP = t unless --etp 1), dense weights over t; the optimizer is
    # spread over every copy either way: 12·P/(t·c·p·d).
    mix = MODEL_PRESETS["mixtral-8x7b"]
    w = wl(mix, s=32768, B=8 * d, t=t, p=4, d=d, e=e, etp=etp, n=4, vp=True, recompute="none")
    top = memory_model(w, build("slimpipe", p=4, m=8, n=4, warmup="single"))[0]
    assert top.optimizer == pytest.approx(12 * mix.num_params() / (t * 4 * d))
    experts = 32 * 3 * 4096 * 14336 * 8
    dense = mix.num_params() - experts
    expert_tp = t if etp is None else etp
    assert top.params_grads == pytest.approx(6 * (dense / (t * 4) + experts / (4 * expert_tp * e)))


def test_mixtral_8x22b_t8_e1_param_grad_is_sharded_over_tp() -> None:
    # The example: t8 p4 e1 d4 holds ≈ 25 GiB of param+grad (Megatron shards experts over
    # expert-TP = t); with experts unsharded over TP (--etp 1) it is ≈ 190 GiB.
    big = MODEL_PRESETS["mixtral-8x22b"]
    kw = dict(s=65536, B=16, t=8, p=4, d=4, n=8, v=14, vp=True)
    sched = build("slimpipe", p=4, m=4, n=8, v=14)
    fixed = memory_model(wl(big, **kw), sched)[0].params_grads / GIB
    folded = memory_model(wl(big, etp=1, **kw), sched)[0].params_grads / GIB
    assert fixed == pytest.approx(24.6, abs=0.05)
    assert folded == pytest.approx(190.0, abs=0.05)


def test_expert_layout_errors_name_the_fix() -> None:
    mix = MODEL_PRESETS["mixtral-8x7b"]
    with pytest.raises(ValueError, match="--etp 1"):  # expert-TP 2 × e 8 does not divide t·c·d = 8
        wl(mix, s=4096, B=4, t=2, d=4, e=8)
    wl(mix, s=4096, B=4, t=2, d=4, e=8, etp=1)  # folded over the TP ranks it fits
    with pytest.raises(ValueError, match="must be 1 or --tp"):
        wl(mix, s=4096, B=4, t=4, d=4, e=2, etp=2)
    with pytest.raises(ValueError, match="dense"):
        wl(s=4096, B=4, t=2, etp=1)


def test_peak_inflight_matches_the_loop_rule() -> None:
    # Peak in-flight on rank r = n·v + w·(p − 1 − r) (reference §4.1), read from the built schedule.
    for p, n, v, warmup, w in [(4, 8, 1, "single", 1), (4, 8, 2, "double", 2), (8, 16, 3, "double", 2)]:
        got = peak_inflight(build("slimpipe", p=p, m=3, n=n, v=v, warmup=warmup))
        assert got == [n * v + w * (p - 1 - r) for r in range(p)]


def test_kv_grad_cycle_term() -> None:
    # g = 4 < n = 8 (p = 4): the other v−1 virtual stages keep (n−g)/n of a prefix gradient.
    s, t, c, n, v = 65536, 4, 1, 8, 3
    w = wl(L70.replace(num_layers=48), s=s, B=2, t=t, c=c, p=4, n=n, v=v, vp=True, recompute="none")
    top = memory_model(w, build("slimpipe", p=4, m=2, n=n, v=v))[0]
    kv_full = s / c * 2 * (8192 / t) * 2
    assert top.kv_grad == pytest.approx(4 * kv_full * (2 * 7 / 8 + 2 * 4 / 8))
