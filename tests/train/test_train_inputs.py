"""`slimpipe train` bad input: each mistake is one line on stderr, exit code 2, before any process starts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import slimpipe.train.launch
from slimpipe.cli import main

TINY = ["--model", "tiny", "--data", "synthetic", "--seq-len", "64", "--steps", "2"]


@pytest.fixture(autouse=True)
def _no_launch(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every case here must fail in the checks: reaching the launcher is a test failure."""

    def refuse(*_a: object, **_k: object) -> int:
        raise AssertionError("a process would have started")

    monkeypatch.setattr(slimpipe.train.launch, "launch", refuse)


def _fails(argv: list[str], capsys: pytest.CaptureFixture[str], *needles: str) -> str:
    try:
        code = main(["train", *argv])
    except SystemExit as exc:  # argparse rejects a malformed flag itself
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1, f"expected a one-line message, got:\n{err}"
    for needle in needles:
        assert needle in err, err
    return err


def _checkpoint(tmp: Path, *, model: str = "tiny", seed: int = 0, step: int = 2) -> Path:
    """A step directory with a trainer_state.json as a real save writes it (DCP shards not needed)."""
    from slimpipe.config import load_model

    d = tmp / "ck" / f"step_{step:06d}"
    d.mkdir(parents=True)
    (d / ".metadata").write_bytes(b"x")
    (d / "trainer_state.json").write_text(json.dumps({
        "step": step, "model": load_model(model).to_dict(), "seed": seed, "data": "synthetic",
        "data_fingerprint": "synthetic",
    }))
    (tmp / "ck" / "latest").write_text(d.name)
    return d


@pytest.mark.parametrize(("argv", "needles"), [
    (["--pp", "3"], ["num_layers=8", "pp·vpp"]),                       # layers do not split
    (["--pp", "2", "--dp", "2", "--global-batch", "3"], ["--global-batch=3", "multiple of 2"]),
    (["--slices", "3"], ["--seq-len=64", "--slices=3"]),
    (["--cp", "4", "--slices", "16", "--pp", "1"], ["--seq-len=64", "n=16 · 2c=8 = 128", "--slices 8"]),
    (["--cp", "3", "--slices", "2", "--pp", "1", "--seq-len", "62"], ["n=2 · 2c=6 = 12", "nearest: 60"]),
    (["--cp", "64", "--slices", "1", "--pp", "1"], ["--cp=64 needs at least 128 tokens"]),
    (["--cp", "2", "--local-pipeline"], ["--local-pipeline runs one process (got tp=1, cp=2)"]),
    (["--pp", "4", "--slices", "1", "--global-batch", "1"], ["micro-batches", "m=1"]),
    (["--model", "nope"], ["--model 'nope' is unknown"]),
    (["--schedule", "zb-v"], ["--schedule 'zb-v' is unknown"]),
    (["--nproc", "3"], ["--nproc=3", "pp·dp"]),
    (["--local-pipeline", "--nproc", "2"], ["--nproc=2", "--local-pipeline"]),
    (["--dtype", "fp8"], ["--dtype"]),
    (["--lr", "-1"], ["--lr=-1"]),
    (["--timeout", "1"], ["--timeout"]),
    (["--slice-split", "halves"], ["--slice-split='halves' is unknown"]),
    (["--slice-split", "equal-flop", "--attn-balance", "2"], ["equal slices"]),
    (["--pp", "2", "--dp", "2", "--ep", "2"], ["--ep=2 needs an MoE model"]),            # tiny is dense
    (["--model", "tiny-moe", "--pp", "2", "--dp", "2", "--ep", "4"], ["--ep=4", "tp·cp·dp=2"]),
    (["--model", "tiny-moe", "--pp", "2", "--dp", "3", "--ep", "3"], ["--ep=3 does not divide num_experts=4"]),
])
def test_bad_layout_and_names(argv: list[str], needles: list[str], tmp_path: Path,
                              capsys: pytest.CaptureFixture[str]) -> None:
    _fails([*TINY, "--out-dir", str(tmp_path / "run"), *argv], capsys, *needles)


def test_slice_split_reaches_the_schedule(tmp_path: Path) -> None:
    from slimpipe.train.config import TrainConfig
    from slimpipe.train.preflight import preflight

    base = dict(model="tiny", data="synthetic", seq_len=2048, steps=2, out_dir=str(tmp_path / "r"))
    equal = preflight(TrainConfig(**base), check_outputs=False).schedule
    flop = preflight(TrainConfig(**base, slice_split="equal-flop"), check_outputs=False).schedule
    seq = preflight(TrainConfig(**base, schedule="seq1f1b"), check_outputs=False).schedule
    assert equal.slice_weights is None
    assert flop.slice_weights == seq.slice_weights and flop.slice_weights[0] > flop.slice_weights[-1]


def test_launcher_world_mismatch(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "4")
    _fails([*TINY, "--out-dir", str(tmp_path)], capsys, "WORLD_SIZE=4", "tp·cp·pp·dp = 1·1·2·1 = 2")


def test_bad_data(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = ["--out-dir", str(tmp_path / "run")]
    base = ["--model", "tiny", "--seq-len", "64", "--steps", "2"]
    _fails([*base, *out, "--data", str(tmp_path / "missing.bin")], capsys, "no such file")
    (tmp_path / "empty.txt").write_text("")
    _fails([*base, *out, "--data", str(tmp_path / "empty.txt")], capsys, "empty")
    (tmp_path / "short.txt").write_text("too short")
    _fails([*base, *out, "--data", str(tmp_path / "short.txt")], capsys, "fewer than seq_len+1=65")
    np.array([1, 2, 300] * 100, dtype=np.uint16).tofile(tmp_path / "big.bin")
    _fails([*base, *out, "--data", str(tmp_path / "big.bin")], capsys, "token id 300", "vocab_size=256")
    np.arange(99, dtype=np.uint8).tofile(tmp_path / "odd.bin")
    _fails([*base, *out, "--data", str(tmp_path / "odd.bin")], capsys, "--data-dtype")


def test_bad_checkpoints(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = ["--out-dir", str(tmp_path / "run")]
    _fails([*TINY, *out, "--resume", str(tmp_path / "nothing")], capsys, "no checkpoint")
    step = _checkpoint(tmp_path, model="small")
    _fails([*TINY, *out, "--resume", str(step)], capsys, "another model", "hidden")
    (step / "trainer_state.json").write_text("{not json")
    _fails([*TINY, *out, "--resume", str(step)], capsys, "unreadable checkpoint")


def test_checkpoint_other_seed_or_finished(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = ["--out-dir", str(tmp_path / "run")]
    _checkpoint(tmp_path, seed=5)
    _fails([*TINY, *out, "--resume", str(tmp_path / "ck")], capsys, "--seed 5")
    _fails([*TINY, *out, "--seed", "5", "--steps", "2", "--resume", str(tmp_path / "ck")], capsys,
           "already at step 2")


def test_output_not_writable(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "file").write_text("a file, not a directory")
    _fails([*TINY, "--out-dir", str(tmp_path / "file" / "run")], capsys, "--out-dir", "not writable")


def test_existing_outputs_are_not_clobbered(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    _fails([*TINY, "--out-dir", str(run)], capsys, "exists", "--overwrite")
    assert (run / "metrics.jsonl").read_text() == '{"step": 1}\n'
    (run / "metrics.jsonl").unlink()
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "latest").write_text("step_000001")
    _fails([*TINY, "--out-dir", str(run), "--checkpoint-every", "1"], capsys, "another run's checkpoints")


def test_config_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "c.toml").write_text('model = "tiny"\ndata = "synthetic"\nseq-len = 63\n')
    _fails(["--config", str(tmp_path / "c.toml"), "--out-dir", str(tmp_path)], capsys, "--seq-len=63")
    # flags override the file: the error now names the flag's seq-len
    _fails(["--config", str(tmp_path / "c.toml"), "--out-dir", str(tmp_path), "--seq-len", "64",
            "--slices", "3"], capsys, "--seq-len=64", "--slices=3")
    (tmp_path / "c.json").write_text(json.dumps({"model": "tiny", "sequence": 4}))
    _fails(["--config", str(tmp_path / "c.json")], capsys, "unknown keys ['sequence']")
    (tmp_path / "bad.toml").write_text("model = ")
    _fails(["--config", str(tmp_path / "bad.toml")], capsys, "cannot parse")


@pytest.mark.parametrize(("argv", "needles"), [
    (["--clip", "-1"], ["--clip=-1.0", "≥ 0"]),
    (["--weight-decay", "-1"], ["--weight-decay=-1.0"]),
    (["--peak-tflops", "-1"], ["--peak-tflops=-1.0"]),
    (["--lr", "inf"], ["--lr=inf", "finite"]),
    (["--lr", "nan"], ["--lr=nan"]),
    (["--timeout", "inf"], ["--timeout=inf"]),
    (["--threads", "1000"], ["--threads=1000", "oversubscribed", "--threads ≤"]),
    (["--schedule", "1f1b", "--slices", "1", "--attn-balance", "2"],
     ["--attn-balance=2 needs --schedule slimpipe"]),
    (["--nonfinite", "ignore"], ["--nonfinite"]),
    (["--seq-len", "1000000000000", "--slices", "1"], ["needs ~", "PiB", "shorter --seq-len"]),
])
def test_bad_numbers_and_combinations(argv: list[str], needles: list[str], tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    _fails([*TINY, "--out-dir", str(tmp_path / "run"), *argv], capsys, *needles)
    assert not (tmp_path / "run").exists()


def test_odd_head_dim_and_directories(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from slimpipe.config import load_model

    fields = {**load_model("tiny").to_dict(), "num_heads": 4, "head_dim": 33}
    fields.pop("name")
    (tmp_path / "odd.json").write_text(json.dumps(fields))
    out = ["--out-dir", str(tmp_path / "run")]
    _fails(["--model", str(tmp_path / "odd.json"), "--data", "synthetic", "--seq-len", "64", *out], capsys,
           "head_dim=33 is odd", "RoPE")
    _fails(["--model", "tiny", "--seq-len", "64", "--data", str(tmp_path), *out], capsys, "is a directory")
    _fails(["--config", str(tmp_path), *out], capsys, "--config", "is a directory")


def _saved(tmp: Path, *, data: str = "synthetic", fingerprint: str = "synthetic") -> Path:
    """A step directory laid out as a save writes it, with its checksums (shard contents are stand-ins:
    every check here happens before anything loads them)."""
    from slimpipe.train.manifest import file_digest, write_manifest

    d = _checkpoint(tmp)
    state = json.loads((d / "trainer_state.json").read_text())
    state.update(data=data, data_fingerprint=fingerprint)
    (d / "trainer_state.json").write_text(json.dumps(state))
    (d / ".metadata").write_bytes(b"dcp metadata" * 100)
    for r in range(2):
        (d / f"__{r}_0.distcp").write_bytes(bytes(range(256)) * 64)
    write_manifest(d, {p.name: file_digest(p) for p in d.iterdir()})
    return d


@pytest.mark.parametrize(("damage", "needles"), [
    ("truncate", ["__1_0.distcp has 8,000 bytes, the save wrote 16,384"]),
    ("remove", ["__0_0.distcp is missing"]),
    ("garble-metadata", [".metadata: SHA-256 differs", "corrupted"]),
    ("garble-latest", ["latest does not name a step directory"]),
    ("garble-checksums", ["unreadable checksum list"]),
])
def test_damaged_checkpoints(damage: str, needles: list[str], tmp_path: Path,
                             capsys: pytest.CaptureFixture[str]) -> None:
    step = _saved(tmp_path)
    if damage == "truncate":
        with (step / "__1_0.distcp").open("r+b") as fh:
            fh.truncate(8000)
    elif damage == "remove":
        (step / "__0_0.distcp").unlink()
    elif damage == "garble-metadata":
        (step / ".metadata").write_bytes(b"\x00garbage" * 150)  # same size, other bytes
    elif damage == "garble-latest":
        (tmp_path / "ck" / "latest").write_bytes(bytes(range(200, 256)))
    else:
        (step / "checksums.json").write_bytes(b"\xff\xfe not json")
    _fails([*TINY, "--out-dir", str(tmp_path / "run"), "--resume", str(tmp_path / "ck")], capsys, *needles)
    assert not (tmp_path / "run" / "metrics.jsonl.partial").exists()


def test_resume_after_the_data_changed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "corpus.txt"
    data.write_bytes(bytes(range(256)) * 4)
    _saved(tmp_path, data=str(data), fingerprint="0123456789abcdef")  # what the file hashed to then
    _fails(["--model", "tiny", "--seq-len", "64", "--steps", "4", "--data", str(data), "--out-dir",
            str(tmp_path / "run"), "--resume", str(tmp_path / "ck")], capsys,
           f"the contents of {data} changed since the save", "restore the file")
