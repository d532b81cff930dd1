"""Bad checkpoints and tokenizers: one line naming the fix, exit 2, no file written or changed."""

from __future__ import annotations

import json
import shutil

import pytest

from slimpipe.cli import main


def _snapshot(root):
    return {p: p.stat().st_mtime_ns for p in root.rglob("*")}


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _broken(tmp_path, assets, how):
    d = _copy(assets["tied"], tmp_path / "ckpt")
    cfg = json.loads((d / "config.json").read_text())
    if how == "truncated":
        f = d / "model.safetensors"
        f.write_bytes(f.read_bytes()[:-100])
    elif how == "garbage":
        (d / "model.safetensors").write_bytes(b"\xff" * 64)
    elif how == "mistral":
        cfg["model_type"] = "mistral"
    elif how == "shape":
        cfg["intermediate_size"] = 64
    elif how == "yarn":
        cfg["rope_scaling"] = {"rope_type": "yarn", "factor": 4.0}
    elif how == "bias":
        cfg["attention_bias"] = True
    (d / "config.json").write_text(json.dumps(cfg))
    return d


CASES = {
    "truncated": "not a valid safetensors file", "garbage": "not a valid safetensors file",
    "mistral": "model_type 'mistral'", "shape": "has shape", "yarn": "'yarn' is not supported",
    "bias": "attention_bias=True",
}


@pytest.mark.timeout(120)
def test_bad_checkpoints_exit_2(assets, tmp_path, capfd):
    data = tmp_path / "tokens.npy"
    import numpy as np

    np.save(data, np.arange(100, dtype=np.uint16) % 50)
    for how, words in CASES.items():
        d = _broken(tmp_path / how, assets, how)
        before = _snapshot(tmp_path)
        for argv in (["eval", "--init-from", str(d), "--data", str(data), "--seq-len", "8"],
                     ["train", "--init-from", str(d), "--data", str(data), "--seq-len", "8",
                      "--out-dir", str(tmp_path / "run")]):
            assert main(argv) == 2, how
            err = capfd.readouterr().err.strip().splitlines()
            assert len(err) == 1 and words in err[0], (how, err)
        assert _snapshot(tmp_path) == before, how  # nothing written, nothing touched


@pytest.mark.timeout(120)
def test_bad_tokenizer_and_export_exit_2(assets, tmp_path, capfd):
    before = _snapshot(assets["jsonl"].parent)
    for tok, words in ((tmp_path / "nowhere", "no tokenizer.json"), (assets["tied"], "no tokenizer.json")):
        assert main(["eval", "--init-from", str(assets["tied"]), "--data", str(assets["jsonl"]),
                     "--tokenizer", str(tok), "--seq-len", "8"]) == 2
        err = capfd.readouterr().err.strip().splitlines()
        assert len(err) == 1 and words in err[0], err
    no_eos = _copy(assets["tok"], tmp_path / "tok")
    (no_eos / "tokenizer_config.json").write_text("{}")
    assert main(["eval", "--init-from", str(assets["tied"]), "--data", str(assets["jsonl"]),
                 "--tokenizer", str(no_eos), "--seq-len", "8"]) == 2
    assert "no EOS token" in capfd.readouterr().err
    assert _snapshot(assets["jsonl"].parent) == before
    assert main(["export", "--checkpoint", str(tmp_path), "--out", str(tmp_path / "x")]) == 2
    assert "--checkpoint" in capfd.readouterr().err and not (tmp_path / "x").exists()
