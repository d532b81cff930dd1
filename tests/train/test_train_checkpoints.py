"""Checkpoints: resume continues the curve bitwise; a pp=4 checkpoint loads into pp=2; saves are atomic."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from slimpipe.cli import main
from slimpipe.train.checkpoint import resolve_checkpoint
from slimpipe.train import TrainConfig, train
from tests.support.train import TINY, losses, read_log, run_training

pytestmark = [pytest.mark.dist, pytest.mark.timeout(240)]

LAYOUT = dict(pp=2, slices=4, schedule="slimpipe")


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """Four uninterrupted steps: the curve every resumed run must reproduce."""
    return run_training(tmp_path_factory.mktemp("straight"), steps=4, **LAYOUT)


def _crash_in_save_4(out: Path, monkeypatch: pytest.MonkeyPatch, **layout: object) -> None:
    """A 4-step run saving at steps 2 and 4 whose rank 1 vanishes in the middle of the save of step 4: its
    shards written, nothing renamed (SLIMPIPE_FAULT_* test hook)."""
    monkeypatch.setenv("SLIMPIPE_FAULT_RANK", "1")
    monkeypatch.setenv("SLIMPIPE_FAULT_STEP", "save4")
    cfg = TrainConfig(**{**TINY, "out_dir": str(out), "steps": 4, "checkpoint_every": 2, "timeout": 10.0, **layout})
    assert train(cfg) == 1
    monkeypatch.delenv("SLIMPIPE_FAULT_RANK")
    assert not (out / "metrics.jsonl").exists() and (out / "metrics.jsonl.partial").exists()
    ck = out / "checkpoints"
    assert (ck / "latest").read_text().strip() == "step_000002", "a torn save must not move the pointer"
    assert (ck / "step_000004.tmp").is_dir() and not (ck / "step_000004").exists()


def test_resume_is_bitwise(straight: list[dict], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _crash_in_save_4(tmp_path, monkeypatch, **LAYOUT)
    ck = tmp_path / "checkpoints"
    state = json.loads((ck / "step_000002" / "trainer_state.json").read_text())
    assert state["step"] == 2 and state["layout"]["pp"] == 2 and state["finite"] is True
    recs = run_training(tmp_path, steps=4, checkpoint_every=2, resume="latest", **LAYOUT)
    assert [r["step"] for r in recs] == [1, 2, 3, 4], "the resumed log carries the first two records over"
    assert losses(recs) == losses(straight), "resume must continue the loss curve bitwise on CPU"
    assert [r["grad_norm"] for r in recs] == [r["grad_norm"] for r in straight]
    assert sorted(p.name for p in ck.iterdir()) == ["latest", "step_000002", "step_000004"], "torn save cleaned"
    assert resolve_checkpoint("latest", str(ck)) == ck / "step_000004"


def test_reshard_pp4_to_pp2(straight: list[dict], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _crash_in_save_4(tmp_path / "pp4", monkeypatch, pp=4, slices=4, schedule="slimpipe")
    recs = run_training(tmp_path / "pp2", steps=4, resume=str(tmp_path / "pp4" / "checkpoints"), **LAYOUT)
    assert [r["step"] for r in recs] == [3, 4]
    # another layout before the save: equal up to fp32 summation order (see test_train_layouts)
    assert losses(recs) == pytest.approx(losses(straight)[2:], rel=1e-6, abs=0)


def test_checkpoints_are_pruned_and_verified(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    run_training(tmp_path, steps=3, checkpoint_every=1, keep_checkpoints=2, pp=1, slices=1, local_pipeline=True)
    ck = tmp_path / "checkpoints"
    assert sorted(p.name for p in ck.iterdir()) == ["latest", "step_000002", "step_000003"]
    assert main(["checkpoint", "verify", str(ck)]) == 0
    assert "2 of 2 checkpoint(s) verified" in capsys.readouterr().out
    # one flipped bit in a shard: verify names the file; a resume refuses it before loading anything
    shard = ck / "step_000002" / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x10
    shard.write_bytes(data)
    assert main(["checkpoint", "verify", str(ck)]) == 1
    assert "step_000002  BAD  __0_0.distcp: SHA-256 differs" in capsys.readouterr().out
    # the ranks hash large shards themselves: force that path (no shard is hashed before launch)
    monkeypatch.setattr("slimpipe.train.checkpoint._PREFLIGHT_HASH_BYTES", 0)
    again = dict(TINY, out_dir=str(tmp_path / "again"), steps=4, pp=1, slices=1, local_pipeline=True,
                 resume=str(ck / "step_000002"))
    assert train(TrainConfig(**again)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "__0_0.distcp: SHA-256 differs" in err[0], err
    assert not (tmp_path / "again" / "metrics.jsonl.partial").exists()
    shutil.rmtree(ck / "step_000003")  # a lost newest checkpoint: the pointer now names nothing
    with pytest.raises(Exception, match="incomplete"):
        resolve_checkpoint("latest", str(ck))
    assert read_log(tmp_path / "metrics.jsonl")[-1]["step"] == 3


_DISK_FULL = """
mount -t tmpfs -o size=30m tmpfs "$1" || exit 90
"$2" -m slimpipe train --model tiny --data synthetic --seq-len 64 --global-batch 4 --threads 1 --no-progress \
  --peak-tflops 1 --local-pipeline --steps 3 --checkpoint-every 1 --out-dir "$3" --checkpoint-dir "$1/ck"
code=$?
ls -a "$1/ck" >&2
cat "$1/ck/latest" >&2
exit $code
"""


def test_disk_full_during_a_save(tmp_path: Path) -> None:
    """A 30 MiB file system holds one checkpoint (19 MiB) and not two: the second save fails with one line,
    is removed, and the first stays valid (unshare: a private mount, no root needed)."""
    probe = ["unshare", "-rm", "true"]
    if not shutil.which("unshare") or subprocess.run(probe, capture_output=True).returncode:
        pytest.skip("unprivileged mount namespaces are not available")
    disk = tmp_path / "disk"
    disk.mkdir()
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", _DISK_FULL, "sh", str(disk), sys.executable,
                           str(tmp_path / "run")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 4, proc.stderr  # SAVE_FAILED
    lines = proc.stderr.strip().splitlines()
    assert "checkpoint save at step 2 failed" in lines[0], proc.stderr
    assert "the previous checkpoint (step_000001) is intact" in lines[0]
    assert "MiB free of 30 MiB" in lines[0] and "--checkpoint-dir" in lines[0]
    assert lines[1:] == [".", "..", "latest", "step_000001", "step_000001"], "torn save removed, pointer kept"
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
