"""Packed documents: document-causal slice attention, per-document positions, no loss across a boundary.

Oracles, each independent of the runtime's segment logic: a dense boolean document-causal mask in one SDPA
call (the attention block and the unsliced reference), a brute-force count of visible pairs (the spans the
simulator prices), and the documents trained one by one as separate unpacked rows (packing must change
nothing but the batching). fp64, ≤ 1e-10.
"""

from __future__ import annotations

import pytest
import torch

from tests.support.blocks import run_slices
from tests.support.documents import STARTS, dense_mask, doc_ids
from tests.support.models import RTOL, max_rel_error, model, tokens
from slimpipe.runtime import LocalPipelineRuntime, build_reference, reference_loss
from slimpipe.runtime.documents import IGNORE, RowDocs, StepDocs, document_attention
from slimpipe.schedule.builders import build
from slimpipe.sim.documents import slice_spans

SEQ = 32
SEED = 5


@pytest.mark.timeout(60)
@pytest.mark.parametrize("native", [True, False])
def test_document_attention_equals_dense_mask(native: bool) -> None:
    """Slice by slice over per-slice K/V blocks with the dK/dV hand-down (many slicings) = one SDPA call with
    the dense document-causal mask: out and the gradients of q, k, v (GQA 4:2); the explicit-matmul path
    (non-CPU devices) too. A block no carry-in document reaches is never read: it gets no dK/dV at all."""
    gen = torch.Generator().manual_seed(0)
    starts = STARTS[0]
    q = torch.randn(1, SEQ, 4, 8, dtype=torch.float64, generator=gen).requires_grad_()
    k, v = (torch.randn(1, SEQ, 2, 8, dtype=torch.float64, generator=gen).requires_grad_() for _ in range(2))
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=dense_mask(starts, SEQ),
        enable_gqa=True).transpose(1, 2)
    dout = torch.randn(ref.shape, dtype=torch.float64, generator=gen)
    want = torch.autograd.grad(ref, (q, k, v), dout)
    row = RowDocs(starts)
    for bounds in ([0, 8, 16, 24, 32], [0, 11, 12, 32], [0, 2, 31, 32], [0, 32]):
        for x in (q, k, v):
            x.grad = None
        spans = [row.spans(a, e) for a, e in zip(bounds, bounds[1:])]
        out, blocks = run_slices(lambda j, *qkv: document_attention(*qkv, spans[j], native=native), q, k, v,
                                 bounds, dout)
        assert float((out - ref.detach()).abs().max()) < 1e-12, bounds
        for g, w in zip((q.grad, k.grad, v.grad), want):
            assert float((g - w).abs().max() / w.abs().max()) < RTOL, bounds
        if bounds == [0, 8, 16, 24, 32]:  # carry-in documents start at 8 (slice 1), 12 (slices 2, 3)
            assert blocks.deposited == {1, 2}


def test_spans_count_exactly_the_visible_pairs() -> None:
    """prefix pairs = visible (query, key < start) pairs of the dense mask; Σ L(L+1)/2 = the visible pairs
    inside the slice; the row's positions restart at every document."""
    for starts in STARTS:
        mask = dense_mask(starts, SEQ)
        for a, e in ((0, 8), (8, 16), (11, 30), (29, 32), (12, 13)):
            sp = slice_spans(starts, a, e)
            prefix, _ = sp.pairs()
            assert prefix == int(mask[a:e, :a].sum())
            assert sum((y - x) * (y - x + 1) // 2 for x, y in sp.segments) == int(mask[a:e, a:e].sum())
        pos = RowDocs(starts).positions(0, SEQ, torch.device("cpu"))
        want = torch.tensor([i - max(x for x in starts if x <= i) for i in range(SEQ)], dtype=torch.float64)
        assert torch.equal(pos, want)


def test_step_docs_mask_the_boundary_labels() -> None:
    toks = tokens(3, SEQ, seed=1)
    docs = StepDocs.of(toks, doc_ids(STARTS, SEQ))
    for r, starts in enumerate(STARTS):
        ignored = {i for i in range(SEQ) if i + 1 in starts}  # label i is token i+1: it opens a document
        assert {i for i in range(SEQ) if docs.labels[r, i] == IGNORE} == ignored
        assert torch.equal(docs.labels[r][docs.labels[r] != IGNORE], toks[r, 1:][docs.labels[r] != IGNORE])
    assert docs.valid_labels == 3 * SEQ - sum(len(s) - 1 for s in STARTS)
    with pytest.raises(ValueError, match="must not decrease"):
        StepDocs.of(toks, doc_ids(STARTS, SEQ).flip(1))


def _grads(rt: LocalPipelineRuntime) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for m, shard in rt.rank_models():
        for name, p in m.named_parameters():
            if p.grad is None:
                continue
            if shard is not None and name in ("embed.weight", "head.weight"):  # vocabulary rows
                out[name] = torch.cat([out[name], p.grad]) if name in out else p.grad
            else:
                out.setdefault(name, p.grad)
    return {n: g[: 64] if n in ("embed.weight", "head.weight") else g for n, g in out.items()}


@pytest.mark.timeout(120)
def test_packed_pipeline_equals_reference_and_separate_documents() -> None:
    """Pipelined with slices (slimpipe p2 n4, interleaved vocab-parallel p2 v2 n4 with full recompute,
    seq1f1b unequal slices with partial recompute) = the unsliced reference with the dense document mask
    (loss, every gradient, evaluate()), positions per document and along the row; and the reference =
    every document as its own unpacked row (sum of losses and gradients)."""
    cfg = model(4)
    toks, docs = tokens(3, SEQ, seed=2), doc_ids(STARTS, SEQ)
    labels = sum(SEQ - len(s) + 1 for s in STARTS)
    ref = build_reference(cfg, seed=SEED, dtype=torch.float64)
    out = reference_loss(ref, toks, documents=docs)
    out.backward()
    loss = out.detach()
    want = {n: p.grad.clone() for n, p in ref.named_parameters()}

    alone = build_reference(cfg, seed=SEED, dtype=torch.float64)  # each document as its own row
    total = 0.0
    for r, starts in enumerate(STARTS):
        for a, e in zip(starts, (*starts[1:], SEQ + 1)):
            if e - a >= 2:  # a 1-token document has no label inside it
                part = reference_loss(alone, toks[r : r + 1, a : e if e <= SEQ else SEQ + 1], normaliser=labels)
                part.backward()
                total += float(part)
    assert abs(total - float(loss)) / float(loss) < RTOL
    assert max_rel_error({n: p.grad for n, p in alone.named_parameters()}, want)[0] < RTOL

    cases = [(build("slimpipe", p=2, m=3, n=4), False, "none", True),
             (build("slimpipe", p=2, m=3, n=4, v=2), True, "full", True),
             (build("seq1f1b", p=2, m=3, n=4, slice_weights=(0.4, 0.3, 0.2, 0.1)), False, "partial", False)]
    for sched, vocab, recompute, restart in cases:
        rt = LocalPipelineRuntime(cfg, sched, dtype=torch.float64, seed=SEED, vocab_parallel=vocab,
                                  recompute=recompute, restart_positions=restart)
        res = rt.forward_backward(toks, reduce_grads=True, documents=docs)
        assert abs(res.loss - float(loss)) / float(loss) < RTOL, sched.name
        err, name = max_rel_error(_grads(rt), want)
        assert err < RTOL, (sched.name, name, err)
        assert abs(rt.evaluate(toks, documents=docs).loss - float(loss)) / float(loss) < RTOL
    plain = LocalPipelineRuntime(cfg, cases[0][0], dtype=torch.float64, seed=SEED)
    assert abs(plain.forward_backward(toks).loss - float(loss)) > 1e-3  # the masks matter
