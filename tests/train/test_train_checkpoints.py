"""Checkpoints: resume continues the curve bitwise; a pp=4 checkpoint loads into pp=2; saves are atomic."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from slimpipe.train.checkpoint import resolve_checkpoint
from slimpipe.train import TrainConfig, train
from tests.support.train import TINY, losses, read_log, run_training

pytestmark = [pytest.mark.dist, pytest.mark.timeout(240)]

LAYOUT = dict(pp=2, slices=4, schedule="slimpipe")


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """Four uninterrupted steps: the curve every resumed run must reproduce."""
    return run_training(tmp_path_factory.mktemp("straight"), steps=4, **LAYOUT)


def _crash_at_step_3(out: Path, monkeypatch: pytest.MonkeyPatch, **layout: object) -> None:
    """A 4-step run with a checkpoint at step 2 whose rank 1 dies at step 3 (SLIMPIPE_FAULT_* test hook)."""
    monkeypatch.setenv("SLIMPIPE_FAULT_RANK", "1")
    monkeypatch.setenv("SLIMPIPE_FAULT_STEP", "3")
    cfg = TrainConfig(**{**TINY, "out_dir": str(out), "steps": 4, "checkpoint_every": 2, "timeout": 10.0, **layout})
    assert train(cfg) == 1
    monkeypatch.delenv("SLIMPIPE_FAULT_RANK")
    assert not (out / "metrics.jsonl").exists() and (out / "metrics.jsonl.partial").exists()


def test_resume_is_bitwise(straight: list[dict], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _crash_at_step_3(tmp_path, monkeypatch, **LAYOUT)
    ck = tmp_path / "checkpoints"
    assert (ck / "latest").read_text().strip() == "step_000002"
    state = json.loads((ck / "step_000002" / "trainer_state.json").read_text())
    assert state["step"] == 2 and state["layout"]["pp"] == 2
    # a save that crashed half-way leaves a .tmp directory: it must not disturb the resume
    (ck / "step_000003.tmp").mkdir()
    (ck / "step_000003.tmp" / "__0_0.distcp").write_bytes(b"torn")
    recs = run_training(tmp_path, steps=4, checkpoint_every=2, resume="latest", **LAYOUT)
    assert [r["step"] for r in recs] == [1, 2, 3, 4], "the resumed log carries the first two records over"
    assert losses(recs) == losses(straight), "resume must continue the loss curve bitwise on CPU"
    assert [r["grad_norm"] for r in recs] == [r["grad_norm"] for r in straight]
    assert sorted(p.name for p in ck.iterdir()) == ["latest", "step_000002", "step_000004"], "torn save cleaned"
    assert resolve_checkpoint("latest", str(ck)) == ck / "step_000004"


def test_reshard_pp4_to_pp2(straight: list[dict], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _crash_at_step_3(tmp_path / "pp4", monkeypatch, pp=4, slices=4, schedule="slimpipe")
    recs = run_training(tmp_path / "pp2", steps=4, resume=str(tmp_path / "pp4" / "checkpoints"), **LAYOUT)
    assert [r["step"] for r in recs] == [3, 4]
    # another layout before the save: equal up to fp32 summation order (see test_train_layouts)
    assert losses(recs) == pytest.approx(losses(straight)[2:], rel=1e-6, abs=0)


def test_checkpoints_are_pruned(tmp_path: Path) -> None:
    run_training(tmp_path, steps=3, checkpoint_every=1, keep_checkpoints=2, pp=1, slices=1, local_pipeline=True)
    ck = tmp_path / "checkpoints"
    assert sorted(p.name for p in ck.iterdir()) == ["latest", "step_000002", "step_000003"]
    shutil.rmtree(ck / "step_000003")  # a lost newest checkpoint: the pointer now names nothing
    with pytest.raises(Exception, match="incomplete"):
        resolve_checkpoint("latest", str(ck))
    assert read_log(tmp_path / "metrics.jsonl")[-1]["step"] == 3
