"""`--pack-documents` end to end: document boundaries from the data (stdlib files, --eod-id in a token
file), a real training and evaluation with document-causal attention, and bad input refused in one line."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.support.train import run_training
from slimpipe.cli import main
from slimpipe.config import ConfigError
from slimpipe.train.data import load_data, stdlib_corpus


def test_document_boundaries_of_the_data(tmp_path) -> None:
    """stdlib: a document per file (after each joining newline); a token file: after every --eod-id; the
    batch's per-token document indices follow the sampled windows."""
    data = load_data("stdlib", vocab_size=256, seq_len=64, need_documents=True)
    blob, _ = stdlib_corpus()
    assert data.docs[0] == 0 and (blob[data.docs[1:] - 1] == ord("\n")).all()
    ids = np.array([5, 6, 0, 7, 0, 0, 8, 9, 10, 0, 11, 12], dtype=np.uint16)
    path = tmp_path / "toks.npy"
    np.save(path, ids)
    data = load_data(str(path), vocab_size=16, seq_len=4, eod_id=0, need_documents=True)
    assert data.docs.tolist() == [0, 3, 5, 6, 10]  # the EOD belongs to the document it ends
    rows = data.window_documents(0, 2, 4)  # windows [0, 5) and [4, 9)
    assert rows.tolist() == [[0, 0, 0, 1, 1], [1, 2, 3, 3, 3]]
    with pytest.raises(ConfigError, match="--pack-documents"):
        load_data(str(path), vocab_size=16, seq_len=4, need_documents=True)


def test_train_and_eval_packed_stdlib(tmp_path, capfd) -> None:
    small = tmp_path / "model.json"
    small.write_text(json.dumps({"name": "bytes-2l", "num_layers": 2, "hidden": 64, "ffn": 128, "num_heads": 4,
                                 "num_kv_heads": 2, "head_dim": 16, "vocab_size": 256}))
    recs = run_training(tmp_path / "run", model=str(small), data="stdlib", pack_documents=True, pp=2, slices=4,
                        local_pipeline=True, steps=2, seq_len=256, checkpoint_every=2)
    assert len(recs) == 2 and all(np.isfinite(r["loss"]) for r in recs)
    capfd.readouterr()
    code = main(["eval", "--resume", str(tmp_path / "run" / "checkpoints"), "--data", "stdlib", "--seq-len", "2048",
                 "--pp", "2", "--slices", "4", "--local-pipeline", "--pack-documents", "--max-windows", "3",
                 "--json"])
    res = json.loads(capfd.readouterr().out.strip().splitlines()[-1])
    assert code == 0 and res["layout"]["pack_documents"] is True
    # the first files of the stdlib end inside these 6K bytes: their boundary labels take no loss
    assert 3 * 2048 - 50 < res["tokens"] < 3 * 2048


@pytest.mark.parametrize("argv, needle", [
    (["--data", "synthetic", "--pack-documents"], "document boundaries"),
    (["--data", "stdlib", "--pack-documents", "--attn-balance", "1"], "--attn-balance 0"),
    (["--data", "stdlib", "--eod-id", "-5"], "--eod-id"),
    (["--data", "stdlib", "--pack-documents", "--cp", "2", "--seq-len", "128"], "--cp 1"),
])
def test_bad_packing_input(argv: list[str], needle: str, capsys, tmp_path) -> None:
    code = main(["train", "--model", "tiny", "--seq-len", "64", "--steps", "1", "--out-dir", str(tmp_path / "x"),
                 *argv])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and needle in err, err
    assert not (tmp_path / "x").exists()
