"""Tensor parallelism in and out: t = 2 ranks (× p = 2) read exactly their column/row blocks and
vocabulary rows of a Hugging Face checkpoint; the fp64 loss and every gradient piece equal transformers';
a DCP checkpoint written at t = 2 exports to a directory transformers loads with the same weights."""

from __future__ import annotations

import pytest
import torch

import tests.support.hf as hs
from tests.support.dist import run_dist
from slimpipe.cli import main
from slimpipe.hf.config import hf_name, open_checkpoint
from slimpipe.hf.weights import load_hf_weights
from slimpipe.runtime import ParallelState, PipelineRuntime
from slimpipe.runtime.vocab import VOCAB_SHARDED
from slimpipe.schedule.builders import build
from slimpipe.train.checkpoint import save_checkpoint

pytestmark = pytest.mark.dist
FP64 = 1e-10


def _tokens() -> torch.Tensor:
    return torch.randint(0, hs.VOCAB, (2, 33), generator=torch.Generator().manual_seed(5))


def _worker(rank: int, world: int, path: str, out: str) -> dict:
    ckpt = open_checkpoint(path)
    state = ParallelState.create(pp=2, tp=2, timeout_s=60.0)
    res = {}
    for vp in (False, True):
        rt = PipelineRuntime(ckpt.model, build("slimpipe", p=2, m=2, n=4), state, dtype=torch.float64,
                             seed=9, vocab_parallel=vp)
        st = load_hf_weights(rt, ckpt)
        step = rt.forward_backward(_tokens(), reduce_grads=True)
        evaluated = rt.evaluate(_tokens()).loss
        shard = rt.vocab.shard if rt.vocab is not None else None
        pieces = {}
        for name, p in rt.model.named_parameters():
            if vp and name in VOCAB_SHARDED:
                where = ("rows", shard.lo, shard.valid)
            elif name in rt.model.tp_shards:
                s = rt.model.tp_shards[name]
                where = ("tp", s.dim, s.index, s.count)
            else:
                where = ("whole",)
            pieces[name] = (where, p.detach().clone(), p.grad.clone())
        own = sum(p.numel() * 4 for p in rt.model.parameters())
        res[vp] = (step.loss, evaluated, st.bytes_read, own, pieces)
        if vp:  # a t = 2 checkpoint (DTensor pieces + full vocabulary tensors) for the export below
            save_checkpoint(rt, out, 1, {"model": ckpt.model.to_dict()}, rank=rank, keep=1)
    return res


def _cut(full: torch.Tensor, where: tuple) -> torch.Tensor:
    if where[0] == "rows":
        _, lo, valid = where
        return full[lo : lo + valid]
    if where[0] == "tp":
        _, dim, index, count = where
        size = full.size(dim) // count
        return full.narrow(dim, index * size, size)
    return full


@pytest.mark.timeout(300)
def test_tp_load_gradients_and_export(assets, tmp_path):
    path = assets["tp2"]
    ckpt = open_checkpoint(path)
    model = hs.oracle(path, torch.float64)
    out = hs.hf_loss(model, _tokens())
    out.backward()
    loss = out.item()
    params = {n: p.detach() for n, p in model.named_parameters()}
    grads = {n: p.grad for n, p in model.named_parameters()}
    results = run_dist(_worker, 4, str(path), str(tmp_path / "ckpt"), timeout_s=240)
    for vp in (False, True):
        seen: dict[str, int] = {}
        for rank, res in enumerate(results):
            got_loss, evaluated, read, own, pieces = res[vp]
            assert abs(got_loss - loss) / loss < FP64 and abs(evaluated - loss) / loss < FP64
            if not vp:  # vocabulary-parallel shards are padded: their padding rows are not read
                assert read == own
            assert read < 0.4 * ckpt.num_bytes  # a quarter of the model (t·p = 4) plus the norm weights
            for name, (where, value, grad) in pieces.items():
                n = min(value.size(0), _cut(params[hf_name(name)], where).size(0))
                assert torch.equal(value[:n], _cut(params[hf_name(name)], where)), (vp, rank, name)
                assert hs.rel(grad[:n], _cut(grads[hf_name(name)], where)) < FP64, (vp, rank, name)
                seen[name] = seen.get(name, 0) + 1
        assert set(map(hf_name, seen)) == set(params)  # every tensor is held somewhere

    exported = tmp_path / "exported"
    assert main(["export", "--checkpoint", str(tmp_path / "ckpt"), "--out", str(exported)]) == 0
    again = hs.oracle(exported, torch.float64)
    for name, p in again.named_parameters():  # the export is the checkpoint the ranks loaded (no step taken)
        assert torch.equal(p, params[name]), name
