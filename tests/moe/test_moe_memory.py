"""The runtime's MoE memory against the memory model (issue #12; bench/moe_memory_bench.py, BENCHMARKS.md
"MoE: measured expert bytes and saved activations (runtime)"), on the tiny-moe preset at s = 128.

One forked group of 4 gloo ranks runs one SlimPipe forward+backward (p = 2, m = 2, n = 4, float32) per layout
t p e: 1 2 1 (d 2), 1 2 2 (d 2, experts split over 2 data-parallel ranks) and 2 2 1 (d 1, every expert split
over the TP pair). Per rank:

* the bytes of the expert weights it holds equal ``slimpipe.sim.memory.params_on_gpu`` to the byte, and
  the plain count L/p · E · 3hf · 4 B / (t·e) (so a runtime that stopped sharding experts fails even if
  the model stopped too);
* the first stage's peak saved-for-backward bytes (no output layer, final norm or loss there), per
  sequence-parallel token per layer at the schedule's peak in-flight count, are within 3 % of the model's a
  without K/V (kept in the runtime's K/V store), in the run's dtype. At e = 2 the per-rank figure follows
  how many tokens the router sends to that rank's experts (the model assumes a uniform spread), so there the
  mean over the expert-parallel pair is compared.
"""

from __future__ import annotations

import pytest
import torch

from tests.support.dist import run_dist
from tests.support.models import tokens
from slimpipe.config import MODEL_PRESETS, ParallelConfig
from slimpipe.models.moe import is_expert_parameter
from slimpipe.runtime import ParallelState, PipelineRuntime
from slimpipe.schedule.builders import build
from slimpipe.sim import Workload
from slimpipe.sim.memory import activation_bytes_per_token, params_on_gpu, peak_inflight

pytestmark = pytest.mark.dist

CFG = MODEL_PRESETS["tiny-moe"]  # 8 layers, h 128, 4 SwiGLU experts of f 256, top-2
WORLD, SEQ, M, N = 4, 128, 2, 4
LAYOUTS = ((1, 2, 1), (1, 2, 2), (2, 2, 1))  # (t, p, e); d = WORLD / (t·p)
ITEMSIZE = 4  # float32
TOLERANCE = 0.03


def _worker(rank: int, world: int) -> dict:
    out = {}
    for t, p, e in LAYOUTS:
        dp = world // (t * p)
        state = ParallelState.create(pp=p, tp=t, dp=dp, ep=e, timeout_s=60.0)
        rt = PipelineRuntime(CFG, build("slimpipe", p=p, m=M, n=N), state, dtype=torch.float32, seed=0)
        toks = tokens(M * dp, SEQ, seed=0, vocab=CFG.vocab_size)
        res = rt.forward_backward(toks[state.dp_rank * M:(state.dp_rank + 1) * M])
        expert = sum(q.numel() * q.element_size() for n, q in rt.named_parameters() if is_expert_parameter(n))
        out[(t, p, e)] = (state.pp_rank, state.ep_rank, expert, res.peak_saved_bytes[state.pp_rank])
    return out


def _model(t: int, p: int, e: int, pp_rank: int) -> tuple[float, float, float]:
    """(expert bytes, a − K/V in the run's dtype per token per layer, peak in-flight units) of the model."""
    dp = WORLD // (t * p)
    work = Workload(model=CFG, parallel=ParallelConfig(tp=t, pp=p, dp=dp, ep=e, slices=N), seq_len=SEQ,
                    global_batch=M * dp)
    a, _ = activation_bytes_per_token(work)
    a -= 4 * CFG.kv_dim  # K and V (bf16) live in the K/V store, not among the saved tensors
    inflight = peak_inflight(build("slimpipe", p=p, m=M, n=N))[pp_rank]
    return params_on_gpu(work, pp_rank)[1] * ITEMSIZE, a * ITEMSIZE / 2, inflight


@pytest.mark.timeout(60)
def test_moe_expert_bytes_and_saved_activations_match_the_memory_model() -> None:
    results = run_dist(_worker, WORLD)
    per_expert = 3 * CFG.hidden * CFG.ffn * ITEMSIZE  # w1, w3, w2
    for t, p, e in LAYOUTS:
        rows = [r[(t, p, e)] for r in results]
        plain = CFG.num_layers // p * CFG.num_experts * per_expert // (t * e)
        per_token: dict[int, float] = {}
        for pp_rank, ep_rank, expert, saved in rows:
            want, a, inflight = _model(t, p, e, pp_rank)
            assert expert == want == plain, ((t, p, e), pp_rank, expert, want, plain)
            if pp_rank == 0:
                tokens_per_layer = inflight * SEQ / N / t * CFG.num_layers / p  # SP shards tokens over t
                per_token.setdefault(ep_rank, saved / tokens_per_layer)
        a = _model(t, p, e, 0)[1]
        assert sorted(per_token) == list(range(e)), ((t, p, e), per_token)
        mean = sum(per_token.values()) / e
        assert abs(mean / a - 1) <= TOLERANCE, ((t, p, e), per_token, a)
