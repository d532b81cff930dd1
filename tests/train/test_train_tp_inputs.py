"""`slimpipe train --tp`: each bad layout is one line naming the flag and the fix, exit 2, no process."""

from __future__ import annotations

import pytest

import slimpipe.train.launch
from slimpipe.cli import main

TINY = ["--model", "tiny", "--data", "synthetic", "--steps", "2"]  # tiny: 4 heads / 2 K/V heads, ffn 384, V 256


@pytest.fixture(autouse=True)
def _no_launch(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_a: object, **_k: object) -> int:
        raise AssertionError("a process would have started")

    monkeypatch.setattr(slimpipe.train.launch, "launch", refuse)


@pytest.mark.parametrize(("argv", "needles"), [
    (["--tp", "3"], ["--tp=3 does not divide num_heads=4", "use --tp in [1, 2]"]),
    (["--tp", "4"], ["--tp=4 does not divide num_kv_heads=2"]),
    (["--tp", "2", "--seq-len", "100", "--slices", "4"], ["--seq-len=100", "n=4 · t=2 = 8"]),
    (["--tp", "2", "--seq-len", "96", "--slices", "4", "--schedule", "seq1f1b"],
     ["--tp 2: a slice of", "--slice-split equal"]),
    (["--tp", "2", "--pp", "2", "--nproc", "2"], ["--nproc=2", "tp·cp·pp·dp = 2·1·2·1 = 4", "--nproc 4"]),
    (["--tp", "2", "--local-pipeline"], ["--local-pipeline", "--tp 1"]),
    (["--tp", "0"], ["--tp=0 must be a positive integer"]),
])
def test_bad_tp_layout(argv: list[str], needles: list[str], capsys: pytest.CaptureFixture[str], tmp_path) -> None:
    code = main(["train", *TINY, "--out-dir", str(tmp_path / "run"), *argv])
    err = capsys.readouterr().err
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1, err
    for needle in needles:
        assert needle in err, err
    assert not (tmp_path / "run").exists()  # nothing written before the checks pass


def test_launcher_world_names_tp(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                                 tmp_path) -> None:
    for k, v in {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(k, v)
    code = main(["train", *TINY, "--out-dir", str(tmp_path / "run"), "--tp", "2", "--pp", "2"])
    err = capsys.readouterr().err
    assert code == 2 and "WORLD_SIZE=2" in err and "tp·cp·pp·dp = 2·1·2·1 = 4" in err and "--tp/--cp/--pp/--dp" in err


def test_vocab_parallel_lifts_the_vocabulary_rule(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    """V need not divide by t when --vocab-parallel pads it over t·p: only the model JSON's vocab differs."""
    import json

    spec = tmp_path / "m.json"
    spec.write_text(json.dumps({"name": "odd", "num_layers": 2, "hidden": 32, "ffn": 64, "num_heads": 4,
                                "num_kv_heads": 2, "head_dim": 8, "vocab_size": 255}))
    argv = ["train", "--model", str(spec), "--data", "synthetic", "--steps", "1", "--tp", "2", "--pp", "1",
            "--seq-len", "64", "--out-dir", str(tmp_path / "run")]
    assert main(argv) == 2
    assert "does not divide vocab_size=255" in capsys.readouterr().err
    with pytest.raises(AssertionError, match="a process would have started"):
        main([*argv, "--vocab-parallel"])
