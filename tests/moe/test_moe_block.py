"""The MoE block on its own: routing, capacity, the expert computation, the load-balancing loss by slices."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from tests.support.moe import MOE
from slimpipe.config import MODEL_PRESETS, ConfigError
from slimpipe.models.base import PlainContext
from slimpipe.models.llama import MLP
from slimpipe.models.moe import AUX_LOSSES, ROUTING, MoEMLP, route
from slimpipe.runtime.routing import RoutingBook

E, K, H = 4, 2, 32


def _block(coeff: float = 0.1, capacity: float | None = None, seed: int = 0) -> MoEMLP:
    torch.manual_seed(seed)
    cfg = MOE.replace(aux_loss_coeff=coeff, capacity_factor=capacity)
    blk = MoEMLP(layer=0, hidden=H, num_experts=E, top_k=K, aux_loss_coeff=coeff, capacity_factor=capacity,
                 make_expert=lambda: MLP(cfg)).double()
    for p in blk.parameters():
        nn.init.normal_(p, std=0.3)
    return blk


def _x(t: int = 24, b: int = 1, seed: int = 1) -> torch.Tensor:
    return torch.randn(b, t, H, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


@pytest.mark.timeout(30)
def test_route_picks_top_k_and_renormalises() -> None:
    logits = torch.randn(50, E, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    probs, experts, weights, keep = route(logits, K)
    assert keep is None
    torch.testing.assert_close(probs, torch.softmax(logits, -1))
    assert torch.equal(experts, logits.argsort(-1, descending=True)[:, :K])
    torch.testing.assert_close(weights.sum(-1), torch.ones(50, dtype=torch.float64))
    top2 = torch.softmax(logits.gather(1, experts), -1)  # Mixtral: softmax over the top-k logits
    torch.testing.assert_close(weights, top2)


@pytest.mark.timeout(30)
def test_router_is_deterministic_and_the_same_by_slices() -> None:
    blk, x = _block(), _x(32)
    whole = route(blk.router(x[0]), K)[1]
    again = route(blk.router(x[0]), K)[1]
    sliced = torch.cat([route(blk.router(x[0, s : s + 8]), K)[1] for s in range(0, 32, 8)])
    assert torch.equal(whole, again) and torch.equal(whole, sliced)


@pytest.mark.timeout(30)
def test_capacity_keeps_the_most_probable_copies_per_expert() -> None:
    logits = torch.randn(40, E, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    logits[:, 0] += 2.0  # expert 0 is overloaded
    probs, experts, _, keep = route(logits, K, capacity_factor=1.0)
    cap = math.ceil(1.0 * K * 40 / E)
    for e in range(E):
        routed = experts == e
        kept = routed & keep
        assert int(kept.sum()) == min(cap, int(routed.sum()))
        if kept.sum() < routed.sum():  # every dropped copy is less probable than every kept one
            p = probs[:, e].unsqueeze(1).expand_as(experts)
            assert p[routed & ~keep].max() <= p[kept].min()
    assert route(logits, K, capacity_factor=100.0)[3] is None  # nothing can overflow: dropless


def _naive(blk: MoEMLP, x: torch.Tensor, keep_mask: bool = False) -> torch.Tensor:
    """Σ_k w_k · expert_k(x) token by token (an independent restatement of the block's output)."""
    flat = x.reshape(-1, H)
    _, experts, weights, keep = route(blk.router(flat), K, blk.capacity_factor)
    rows = []
    for t in range(flat.size(0)):
        acc = torch.zeros(H, dtype=x.dtype)
        for s in range(K):
            if keep is None or keep[t, s]:
                acc = acc + weights[t, s] * blk.experts[str(int(experts[t, s]))](flat[t : t + 1])[0]
        rows.append(acc)
    return torch.stack(rows).view_as(x)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("capacity", [None, 0.75])
def test_block_output_is_the_weighted_sum_of_its_experts(capacity) -> None:
    blk, x = _block(coeff=0.0, capacity=capacity), _x(20)
    torch.testing.assert_close(blk(x, PlainContext()), _naive(blk, x), rtol=1e-12, atol=1e-12)


@pytest.mark.timeout(30)
def test_grouped_gemm_matches_the_expert_loop() -> None:
    blk, x = _block(coeff=0.0), _x(40)
    blk, x = blk.float(), x.float()
    try:
        torch._grouped_mm(torch.zeros(8, 32), torch.zeros(2, 32, 8), offs=torch.tensor([4, 8], dtype=torch.int32))
    except (AttributeError, RuntimeError, NotImplementedError):
        pytest.skip("this torch has no CPU grouped GEMM (CUDA-only there)")
    outs, grads = [], []
    for impl in ("loop", "grouped"):
        blk.zero_grad(set_to_none=True)
        blk.experts.impl = impl
        xi = x.clone().requires_grad_()
        y = blk(xi, PlainContext())
        y.backward(torch.ones_like(y))
        outs.append(y.detach())
        grads.append([xi.grad] + [p.grad for p in blk.experts.parameters()])
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)
    for g_grouped, g_loop in zip(grads[1], grads[0]):
        torch.testing.assert_close(g_grouped, g_loop, rtol=1e-5, atol=1e-5)


def _aux_by_hand(blk: MoEMLP, x: torch.Tensor) -> torch.Tensor:
    probs, experts, _, _ = route(blk.router(x.reshape(-1, H)), K)
    t = x.size(1)
    f = torch.stack([(experts == e).sum() for e in range(E)]).double() / (K * t)
    p = probs.mean(0)
    return blk.coeff * E * (f * p).sum()


@pytest.mark.timeout(30)
def test_sliced_balancing_loss_equals_the_whole_sequence_one() -> None:
    # One layer fed slice by slice through a RoutingBook (forwards 0..n−1, then backwards n−1..0) gives the
    # whole sequence's loss and router gradient; the sum of per-slice losses would not.
    t, n, norm = 32, 4, 32.0
    ref_blk, blk, x = _block(), _block(), _x(t)
    ctx = PlainContext()
    y = ref_blk(x, ctx)
    (aux,) = ctx.shared[AUX_LOSSES]
    torch.testing.assert_close(aux[0], _aux_by_hand(ref_blk, x))
    ((y * x).sum() / norm + aux.sum() * t / norm).backward()

    book = RoutingBook()
    book.begin_step(t, norm)
    outs = []
    for j in range(n):
        sl = PlainContext()
        book.attach(sl.shared, 0, j * t // n)
        outs.append(blk(x[:, j * t // n : (j + 1) * t // n], sl))
    for j in reversed(range(n)):
        ((outs[j] * x[:, j * t // n : (j + 1) * t // n]).sum() / norm).backward()
    torch.testing.assert_close(book.aux_loss(torch.device("cpu")), aux.sum() * t / norm, rtol=1e-13, atol=0)
    for (name, p), q in zip(blk.named_parameters(), ref_blk.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=1e-14, msg=name)
    per_slice = sum(_aux_by_hand(ref_blk, x[:, j * t // n : (j + 1) * t // n]) for j in range(n)) / n
    assert abs(float(per_slice.detach() - aux[0].detach())) > 1e-4  # Σ_j f^(j)·P^(j) is another objective


@pytest.mark.timeout(30)
def test_a_backward_before_every_forward_is_refused() -> None:
    blk, x = _block(), _x(16)
    book = RoutingBook()
    book.begin_step(16, 16.0)
    ctx = PlainContext()
    book.attach(ctx.shared, 0, 0)
    y = blk(x[:, :8], ctx)  # slice 0 of 2 only
    with pytest.raises(RuntimeError, match="all 16 tokens"):
        y.sum().backward()
    assert ROUTING in ctx.shared


@pytest.mark.timeout(30)
def test_tiny_moe_preset_and_config_errors() -> None:
    cfg = MODEL_PRESETS["tiny-moe"]
    assert (cfg.num_layers, cfg.hidden, cfg.num_experts, cfg.top_k, cfg.vocab_size) == (8, 128, 4, 2, 256)
    assert cfg.layer_params() == 2 * 128 * 128 + 2 * 128 * 64 + 4 * 3 * 128 * 256 + 128 * 4 + 2 * 128
    with pytest.raises(ConfigError, match="capacity_factor"):
        cfg.replace(capacity_factor=0.0)
    with pytest.raises(ConfigError, match="aux_loss_coeff"):
        cfg.replace(aux_loss_coeff=-1.0)
