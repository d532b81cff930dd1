"""Packed documents on gloo ranks: tensor + sequence parallelism (t2 × p2, with and without the
vocabulary over t·p) and data parallelism (p2 × d2, the loss normalised by the global batch's loss-taking
labels) against the unsliced reference with the dense document mask (fp64, every gradient ≤ 1e-10).
One forked group of 4 ranks runs every layout."""

from __future__ import annotations

import pytest
import torch

from tests.support.documents import STARTS4, doc_ids
from tests.support.dist import run_dist
from tests.support.models import RTOL, model, tokens
from slimpipe.runtime import ParallelState, PipelineRuntime, build_reference, reference_loss
from slimpipe.runtime.vocab import vocab_rows
from slimpipe.schedule.builders import build

pytestmark = pytest.mark.dist
SEQ, SEED = 32, 9
CFG = model(2, num_heads=4, num_kv_heads=2, vocab_size=64)
# (t, p, d, vocab_parallel): every layout of 4 ranks with documents
LAYOUTS = [(2, 2, 1, False), (2, 2, 1, True), (1, 2, 2, False)]


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    return tokens(4, SEQ, seed=4), doc_ids(STARTS4, SEQ)


def _worker(rank: int, world: int) -> dict:
    toks, docs = _batch()
    labels = int((docs[:, 1:] == docs[:, :-1]).sum())
    out = {}
    for t, p, d, vp in LAYOUTS:
        state = ParallelState.create(pp=p, tp=t, dp=d, timeout_s=60.0)
        m = 4 // d
        rows = slice(state.dp_rank * m, (state.dp_rank + 1) * m)
        rt = PipelineRuntime(CFG, build("slimpipe", p=p, m=m, n=4), state, dtype=torch.float64, seed=SEED,
                             vocab_parallel=vp)
        res = rt.forward_backward(toks[rows], reduce_grads=True, documents=docs[rows], loss_tokens=labels)
        shards = {n: (s.dim, s.index, s.count) for n, s in rt.model.tp_shards.items()}
        out[(t, p, d, vp)] = (state.pp_rank, state.tp_rank, res.loss, shards,
                              {n: q.grad.clone() for n, q in rt.model.named_parameters()})
    return out


def _piece(name: str, full: torch.Tensor, shard, *, vp: bool, t: int, p: int, pp_rank: int, tp_rank: int):
    if vp and name in ("embed.weight", "head.weight"):  # vocabulary rows over t·p (no padding at V = 64)
        rows = vocab_rows(CFG.vocab_size, t * p)
        lo = (pp_rank * t + tp_rank) * rows
        return full[lo : lo + rows]
    if shard is None:
        return full
    dim, index, count = shard
    size = full.size(dim) // count
    return full.narrow(dim, index * size, size)


@pytest.mark.timeout(180)
def test_packed_documents_tp_vocab_dp_match_reference() -> None:
    toks, docs = _batch()
    ref = build_reference(CFG, seed=SEED, dtype=torch.float64)
    out = reference_loss(ref, toks, documents=docs)
    out.backward()
    loss = float(out.detach())
    want = {n: q.grad for n, q in ref.named_parameters()}
    results = run_dist(_worker, 4, timeout_s=120)
    for layout in LAYOUTS:
        t, p, _, vp = layout
        for res in results:
            pp_rank, tp_rank, got_loss, shards, grads = res[layout]
            assert abs(got_loss - loss) / loss < RTOL, layout
            for name, g in grads.items():
                w = _piece(name, want[name], shards.get(name), vp=vp, t=t, p=p, pp_rank=pp_rank, tp_rank=tp_rank)
                assert float((g - w).abs().max() / w.abs().max()) < RTOL, (layout, name)
