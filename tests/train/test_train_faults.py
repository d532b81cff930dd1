"""A rank that dies mid-run ends the job: every other rank stops within --timeout, naming it."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from slimpipe.train import TrainConfig, train
from tests.support.train import TINY

pytestmark = [pytest.mark.dist, pytest.mark.timeout(120)]


@pytest.mark.parametrize(("pp", "dead"), [(2, 1), (4, 0)])
def test_killed_rank_ends_the_job(pp: int, dead: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                  capfd: pytest.CaptureFixture[str]) -> None:
    timeout = 9.0
    monkeypatch.setenv("SLIMPIPE_FAULT_RANK", str(dead))  # test hook: that rank calls os._exit(13)
    monkeypatch.setenv("SLIMPIPE_FAULT_STEP", "2")
    cfg = TrainConfig(**{**TINY, "out_dir": str(tmp_path), "steps": 4, "pp": pp, "timeout": timeout})
    t0 = time.monotonic()
    code = train(cfg)
    elapsed = time.monotonic() - t0
    err = capfd.readouterr().err
    assert code == 1
    assert f"rank {dead} failed first (exit code 13)" in err, err
    survivors = [r for r in range(pp) if r != dead]
    for r in survivors:  # each survivor says why it stopped, naming the dead rank
        assert f"rank {r}: stopping" in err and f"rank {dead} stopped responding" in err, err
    stop_s = float(re.search(r"stopped within ([0-9.]+) s", err).group(1))
    assert stop_s < timeout, f"the other ranks took {stop_s} s to stop after rank {dead} died"
    assert elapsed < 120  # startup + one step + detection, on a loaded machine
    assert not (tmp_path / "metrics.jsonl").exists(), "a failed run must not publish its log"
