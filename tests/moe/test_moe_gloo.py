"""Expert and tensor parallelism on real processes (gloo): loss, every gradient and the grad norm equal the
unsliced single-process model's on the whole global batch, with experts spread over e data-parallel ranks
and split over t tensor-parallel ranks.

One forked group of 4 ranks runs every configuration: (t, c, p, d, e) layouts × schedules × vocabulary
parallelism × recompute. Each rank holds E/e experts of each MoE layer (1/t of each under TP); its
gradients (after the TP sum of replicated weights, the dense all-reduce over dp and the expert all-reduce
over the expert-data-parallel group) must match the reference's, cut the way the rank holds them.
One case packs documents (p2 d2 e2): routing is per token, so MoE composes with document-causal attention.
"""

from __future__ import annotations

import math

import pytest
import torch

from tests.support.dist import run_dist
from tests.support.models import RTOL, max_rel_error, tokens
from tests.support.moe import SEED, SEQ, moe_model, packed_documents, reference
from slimpipe.runtime import ParallelState, PipelineRuntime
from slimpipe.schedule.builders import build

pytestmark = pytest.mark.dist

# (t, c, p, e) → cases (builder, n, m, v, vocab-parallel, tied, recompute); d = 4 / (t·c·p). A recomputed
# MoE layer replays its all-to-alls inside the backward, on every member in the same order. With t = 2
# every expert is split over the TP pair (expert-TP = t) and the router routes the all-gathered tokens;
# with c = 2 each rank routes its zig-zag half of every slice and the expert counts are summed over CP.
LAYOUTS = {
    (1, 1, 2, 2): [("slimpipe", 4, 2, 1, False, False, "none"), ("slimpipe", 2, 2, 2, True, True, "full"),
                   ("interleaved-1f1b", 1, 2, 2, False, False, "none"),
                   ("seq1f1b", 4, 2, 1, False, True, "partial+fc1")],
    (1, 1, 1, 4): [("slimpipe", 4, 2, 1, False, False, "none")],
    (1, 1, 1, 2): [("gpipe", 2, 1, 1, True, False, "none")],
    (2, 1, 2, 1): [("slimpipe", 4, 2, 1, False, False, "none"), ("slimpipe", 2, 2, 2, True, True, "full")],
    (2, 1, 1, 2): [("slimpipe", 4, 2, 1, False, False, "none"), ("1f1b", 1, 2, 1, True, True, "partial+fc1")],
    (1, 2, 2, 1): [("slimpipe", 4, 2, 1, False, False, "none"), ("slimpipe", 2, 2, 2, True, False, "full")],
    (1, 2, 1, 2): [("slimpipe", 4, 2, 1, False, False, "none")],
}
# Packed documents with experts (p2 d2 e2, 2 rows per replica): routing is per token and the balancing
# loss per packed row, weighted by the row's share of the normaliser (the global batch's loss-taking labels).
PACKED = ((1, 1, 2, 2), ("slimpipe", 4, 2, 1, False, True, "partial+fc1"))
SPLIT = {"wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "wo": 1, "w2": 1}  # TP split dimension by weight


def _cfg(p: int, v: int, tied: bool):
    return moe_model(max(2, p * v), tie_embeddings=tied)


def _piece(name: str, ref: torch.Tensor, t: int, tp_rank: int) -> torch.Tensor:
    """The part of the full reference gradient a TP rank holds (vocabulary-parallel rows are not compared)."""
    dim = 0 if name in ("embed.weight", "head.weight") else SPLIT.get(name.split(".")[-2])
    return ref if t == 1 or dim is None else ref.chunk(t, dim)[tp_rank]


def _run(state: ParallelState, layout: tuple, case: tuple, packed: bool) -> tuple:
    (t, c, p, e), (name, n, m, v, vocab, tied, recompute) = layout, case
    rt = PipelineRuntime(_cfg(p, v, tied), build(name, p=p, m=m, n=n, v=v), state,
                         dtype=torch.float64, seed=SEED, vocab_parallel=vocab, recompute=recompute)
    mine = slice(state.dp_rank * m, (state.dp_rank + 1) * m)
    toks = tokens(m * state.dp, SEQ, seed=m * state.dp)[mine]
    if packed:
        docs = packed_documents()
        labels = int((docs[:, 1:] == docs[:, :-1]).sum())  # the global batch's loss-taking labels
        res = rt.forward_backward(toks, reduce_grads=True, documents=docs[mine], loss_tokens=labels)
    else:
        res = rt.forward_backward(toks, reduce_grads=True)
    norm = rt._grad_norm()
    full = rt.model_state_dict()  # vocab shards gathered (collective)
    grads = {k: q.grad.clone() for k, q in rt.named_parameters()
             if not (vocab and k in ("embed.weight", "head.weight"))}
    return state.tp_rank, res.loss, norm, grads, sorted(full)


def _worker(rank: int, world: int) -> dict:
    out = {}
    for layout, cases in LAYOUTS.items():
        t, c, p, e = layout
        state = ParallelState.create(pp=p, tp=t, cp=c, ep=e, timeout_s=60.0)
        for case in cases:
            out[(*layout, *case)] = _run(state, layout, case, False)
        if layout == PACKED[0]:
            out[("packed", *layout, *PACKED[1])] = _run(state, layout, PACKED[1], True)
    return out


@pytest.mark.timeout(240)
def test_expert_and_tensor_parallel_gradients_match_the_unsliced_model() -> None:
    results = run_dist(_worker, 4, timeout_s=90.0)
    grid = [(layout, case, False) for layout, cases in LAYOUTS.items() for case in cases] + [(*PACKED, True)]
    for (t, c, p, e), (name, n, m, v, vocab, tied, recompute), packed in grid:
        key = (t, c, p, e, name, n, m, v, vocab, tied, recompute)
        ref_loss, ref = reference(_cfg(p, v, tied), m * (4 // (t * c * p)), packed=packed)
        key = ("packed", *key) if packed else key
        ref_norm = math.sqrt(sum(float(g.pow(2).sum()) for g in ref.values()))
        seen: set[str] = set()
        for tp_rank, loss, norm, grads, names in (r[key] for r in results):
            assert abs(loss - ref_loss) <= RTOL * ref_loss, (key, loss, ref_loss)
            cut = {k: _piece(k, ref[k], t, tp_rank) for k in grads}
            err, worst = max_rel_error(grads, cut)
            assert err <= RTOL, (key, worst, err)
            assert abs(norm - ref_norm) <= 1e-9 * ref_norm, (key, norm, ref_norm)
            seen |= set(names)
            experts = {k.split(".experts.")[1].split(".")[0] for k in grads if ".experts." in k}
            assert len(experts) == 4 // e, (key, experts)  # E/e experts per rank
        assert seen == set(ref), key
