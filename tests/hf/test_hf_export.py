"""Train from a Hugging Face checkpoint, export the training checkpoint back, and load it with transformers:
identical logits; `slimpipe eval --resume` on the checkpoint equals `--init-from` on the export."""

from __future__ import annotations

import json

import pytest
import torch
import torch.distributed.checkpoint as dcp

import tests.support.hf as hs
from slimpipe.cli import main
from slimpipe.hf.config import open_checkpoint
from slimpipe.hf.weights import load_rank, rank_needs
from slimpipe.runtime import build_reference
from slimpipe.runtime.stage import reference_logits
from slimpipe.train import TrainConfig, train


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
@pytest.mark.timeout(240)
def test_train_export_transformers_roundtrip(assets, tmp_path, capfd):
    run = tmp_path / "run"
    cfg = TrainConfig(init_from=str(assets["tied"]), data=str(assets["jsonl"]), tokenizer=str(assets["tok"]),
                      seq_len=32, global_batch=2, pp=2, slices=2, vocab_parallel=True, local_pipeline=True,
                      steps=1, lr_warmup=1, dtype="float64", out_dir=str(run), checkpoint_every=1,
                      threads=1, progress=False)
    assert train(cfg) == 0
    ckpt = run / "checkpoints"
    out = tmp_path / "exported"
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]

    exported = open_checkpoint(out)  # slimpipe reads it back: same model
    start = open_checkpoint(assets["tied"])
    assert exported.model.replace(name="x") == start.model.replace(name="x")
    # The trained weights as DCP stored them (full vocabulary tensors), in a reference model.
    ref = build_reference(exported.model, seed=0, dtype=torch.float64)
    sd = {"model": ref.state_dict()}
    dcp.load(sd, checkpoint_id=str(ckpt / "step_000001"), no_dist=True)
    ref.load_state_dict(sd["model"])
    before = build_reference(start.model, seed=0, dtype=torch.float64)
    load_rank(start, before, rank_needs(before, None))
    assert hs.rel(ref.embed.weight, before.embed.weight) > 1e-4  # the step moved the weights
    ids = torch.randint(0, hs.VOCAB, (2, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert hs.rel(hs.oracle(out, torch.float64)(ids).logits, reference_logits(ref, ids)) < 1e-10

    capfd.readouterr()
    common = ["--data", str(assets["jsonl"]), "--tokenizer", str(assets["tok"]), "--seq-len", "32",
              "--max-windows", "3", "--dtype", "float64", "--local-pipeline", "--json"]
    assert main(["eval", "--resume", str(ckpt), "--pp", "2", "--slices", "2", "--vocab-parallel", *common]) == 0
    a = json.loads(capfd.readouterr().out.strip().splitlines()[-1])
    assert main(["eval", "--init-from", str(out), "--pp", "1", "--slices", "4", *common]) == 0
    b = json.loads(capfd.readouterr().out.strip().splitlines()[-1])
    assert a["tokens"] == b["tokens"] == 96 and abs(a["loss"] - b["loss"]) / b["loss"] < 1e-10
