"""GPU checks (marker ``gpu``, never in CI): slice attention kernels on CUDA and exact pipelined gradients.

Run on the GPU machine with ``pytest -m gpu tests/runtime -q``.
"""

from __future__ import annotations

import pytest
import torch

from tests.support.models import RTOL, max_rel_error, model, reference_grads, tokens
from slimpipe.runtime import LocalPipelineRuntime
from slimpipe.runtime.attention import MaskCache
from slimpipe.runtime.kv import KVStore
from slimpipe.schedule.builders import build
from tests.runtime.test_runtime_attention import _explicit, _sliced

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
CUDA = torch.device("cuda")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 2e-5),
                                        (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("heads, kv_heads", [(8, 8), (8, 2), (8, 1)])
@pytest.mark.parametrize("mode", ["auto", "bias", "table"])  # auto: per-slice blocks, FA2 or explicit matmuls
def test_slices_equal_causal_attention_cuda(dtype, tol, heads, kv_heads, mode) -> None:
    g = torch.Generator(device=CUDA).manual_seed(0)
    s, d = 512, 64
    q = torch.randn(1, s, heads, d, generator=g, device=CUDA, dtype=dtype)
    k = torch.randn(1, s, kv_heads, d, generator=g, device=CUDA, dtype=dtype)
    v = torch.randn(1, s, kv_heads, d, generator=g, device=CUDA, dtype=dtype)
    dout = torch.randn(1, s, heads, d, generator=g, device=CUDA, dtype=dtype)
    qr, kr, vr = (x.double().requires_grad_() for x in (q, k, v))
    ref = _explicit(qr, kr, vr)
    ref_grads = torch.autograd.grad(ref, (qr, kr, vr), dout.double())
    out, backward = _sliced(q, k, v, [0, 64, 128, 256, 384, 512], mode)
    assert (out.double() - ref).abs().max() <= tol * ref.abs().max()
    for got, want in zip(backward(dout), ref_grads):
        assert (got.double() - want).abs().max() <= tol * want.abs().max()


@pytest.mark.timeout(120)
def test_bias_mode_saves_no_dense_mask() -> None:
    """causal_lower_right must reach a fused kernel on CUDA: nothing of size t × end is saved."""
    store = KVStore([0, 1024, 2048, 3072, 4096], MaskCache("bias"))
    saved: list[tuple[int, ...]] = []
    for j in range(4):
        k = torch.randn(1, 1024, 2, 128, device=CUDA, dtype=torch.bfloat16, requires_grad=True)
        q = torch.randn(1, 1024, 16, 128, device=CUDA, dtype=torch.bfloat16, requires_grad=True)
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t,
                                                      lambda t: t):
            store.begin_forward(0, 0, j).layer(0).attend(q, k, k)
    dense = {(1024, 2048), (1024, 3072), (1024, 4096)}  # (t, end) of slices 1..3
    assert not [sh for sh in saved if len(sh) >= 2 and sh[-2:] in dense], saved


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name, p, n, m, v, tied", [
    ("slimpipe", 2, 4, 2, 2, False), ("slimpipe", 4, 8, 3, 1, True), ("seq1f1b", 2, 4, 2, 1, False),
    ("gpipe", 2, 2, 2, 2, True),
])
def test_local_pipeline_on_cuda_matches_cpu_reference(name, p, n, m, v, tied) -> None:
    cfg = model(2 * p * v, tie_embeddings=tied)
    ref_loss, ref = reference_grads(cfg, tokens(m), seed=2)
    rt = LocalPipelineRuntime(cfg, build(name, p=p, m=m, n=n, v=v), dtype=torch.float64, seed=2, device=CUDA)
    res = rt.forward_backward(tokens(m), reduce_grads=True)
    assert res.loss == pytest.approx(ref_loss, rel=RTOL)
    grads = {k: q.grad.cpu() for r in range(p) for k, q in rt.rank_parameters(r)}
    err, worst = max_rel_error(grads, ref)
    assert err <= RTOL, (worst, err)
    assert res.cuda_max_allocated and res.cuda_max_allocated[0] > 0
