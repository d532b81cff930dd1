"""Expert parallelism on real processes (gloo): loss, every gradient and the grad norm equal the unsliced
single-process model's on the whole global batch, with experts spread over e data-parallel ranks.

One forked group of 4 ranks runs every configuration: (p, d, e) layouts × schedules × vocabulary
parallelism. Each rank holds E/e experts of each MoE layer; its gradients (after the dense all-reduce over
dp and the expert all-reduce over the expert-data-parallel group) must match the reference's by name.
"""

from __future__ import annotations

import math

import pytest
import torch

from tests.support.dist import run_dist
from tests.support.models import RTOL, max_rel_error, tokens
from tests.support.moe import SEED, SEQ, moe_model, reference
from slimpipe.runtime import ParallelState, PipelineRuntime
from slimpipe.schedule.builders import build

pytestmark = pytest.mark.dist

# (p, e) → cases (builder, n, m, v, vocab-parallel, tied, recompute); d = 4 / p. A recomputed MoE layer
# replays its all-to-alls inside the backward, on every member in the same order.
LAYOUTS = {
    (2, 2): [("slimpipe", 4, 2, 1, False, False, "none"), ("slimpipe", 2, 2, 2, True, True, "full"),
             ("interleaved-1f1b", 1, 2, 2, False, False, "none"),
             ("seq1f1b", 4, 2, 1, False, True, "partial+fc1")],
    (1, 4): [("slimpipe", 4, 2, 1, False, False, "none")],
    (1, 2): [("gpipe", 2, 1, 1, True, False, "none")],
}


def _cfg(p: int, v: int, tied: bool):
    return moe_model(max(2, p * v), tie_embeddings=tied)


def _worker(rank: int, world: int) -> dict:
    out = {}
    for (p, e), cases in LAYOUTS.items():
        state = ParallelState.create(pp=p, ep=e, timeout_s=60.0)
        for name, n, m, v, vocab, tied, recompute in cases:
            rt = PipelineRuntime(_cfg(p, v, tied), build(name, p=p, m=m, n=n, v=v), state,
                                 dtype=torch.float64, seed=SEED, vocab_parallel=vocab, recompute=recompute)
            toks = tokens(m * state.dp, SEQ, seed=m * state.dp)[state.dp_rank * m : (state.dp_rank + 1) * m]
            res = rt.forward_backward(toks, reduce_grads=True)
            norm = rt._grad_norm()
            full = rt.model_state_dict()  # vocab shards gathered (collective)
            grads = {k: q.grad.clone() for k, q in rt.named_parameters()
                     if not (vocab and k in ("embed.weight", "head.weight"))}
            out[(p, e, name, n, m, v, vocab, tied, recompute)] = (res.loss, norm, grads, sorted(full))
    return out


@pytest.mark.timeout(180)
def test_expert_parallel_gradients_match_the_unsliced_model() -> None:
    results = run_dist(_worker, 4, timeout_s=90.0)
    for (p, e), cases in LAYOUTS.items():
        for name, n, m, v, vocab, tied, recompute in cases:
            key = (p, e, name, n, m, v, vocab, tied, recompute)
            ref_loss, ref = reference(_cfg(p, v, tied), m * (4 // p))
            seen: set[str] = set()
            for loss, norm, grads, names in (r[key] for r in results):
                assert abs(loss - ref_loss) <= RTOL * ref_loss, (key, loss, ref_loss)
                err, worst = max_rel_error(grads, ref)
                assert err <= RTOL, (key, worst, err)
                ref_norm = math.sqrt(sum(float(g.pow(2).sum()) for g in ref.values()))
                assert abs(norm - ref_norm) <= 1e-9 * ref_norm, (key, norm, ref_norm)
                seen |= set(names)
                experts = {k.split(".experts.")[1].split(".")[0] for k in grads if ".experts." in k}
                assert len(experts) == 4 // e, (key, experts)  # E/e experts per rank
            assert seen == set(ref), key
