"""`slimpipe eval --init-from` on forked gloo ranks: each rank reads only the slices it holds, and the loss
over the file's windows equals transformers' (float32) on the same windows."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import tests.support.hf as hs
from slimpipe.cli import main
from slimpipe.hf.config import open_checkpoint
from slimpipe.hf.weights import load_hf_weights
from slimpipe.runtime import ParallelState, PipelineRuntime
from slimpipe.runtime.forked import run_forked
from slimpipe.schedule.builders import build
from slimpipe.train.corpus import tokenize_corpus


def _load_on_rank(rank: int, world: int, path: str) -> tuple[int, int, dict[str, tuple[int, ...]]]:
    ckpt = open_checkpoint(path)
    state = ParallelState.create(pp=world, timeout_s=60)
    rt = PipelineRuntime(ckpt.model, build("slimpipe", p=world, m=2, n=2), state, vocab_parallel=True)
    st = load_hf_weights(rt, ckpt)
    own = sum(p.numel() * 4 for p in rt.model.parameters())
    return st.bytes_read, own, {n: tuple(p.shape) for n, p in rt.model.named_parameters()}


@pytest.mark.dist
@pytest.mark.timeout(120)
def test_each_rank_reads_only_its_slices(assets):
    ckpt = open_checkpoint(assets["llama3"])
    results = run_forked(_load_on_rank, 2, str(assets["llama3"]), timeout_s=60)
    for rank, (read, own, shapes) in enumerate(results):
        assert "layers.0.attn.wq.weight" in shapes if rank == 0 else "layers.3.attn.wq.weight" in shapes
        # its layers, its vocabulary rows (V/p of embed and head), nothing else; padding rows are not read
        assert read == own and read < 0.6 * ckpt.num_bytes


@pytest.mark.dist
@pytest.mark.timeout(180)
def test_eval_cli_pipelined_matches_transformers(assets, capfd):
    seq, windows = 32, 6
    code = main(["eval", "--init-from", str(assets["llama3"]), "--data", str(assets["jsonl"]), "--tokenizer",
                 str(assets["tok"]), "--seq-len", str(seq), "--pp", "2", "--slices", "4", "--vocab-parallel",
                 "--batch", "4", "--max-windows", str(windows), "--threads", "1", "--json"])
    out = capfd.readouterr().out
    assert code == 0
    res = json.loads(out.strip().splitlines()[-1])
    tokens, _ = tokenize_corpus(assets["jsonl"], str(assets["tok"]), "text", hs.VOCAB)
    rows = torch.from_numpy(np.stack([tokens[k * seq : k * seq + seq + 1] for k in range(windows)]).astype(np.int64))
    with torch.no_grad():
        want = float(hs.hf_loss(hs.oracle(assets["llama3"]), rows))
    assert res["tokens"] == windows * seq
    assert abs(res["loss"] - want) / want < 1e-5
    assert abs(res["perplexity"] - np.exp(want)) / np.exp(want) < 1e-4
