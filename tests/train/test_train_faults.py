"""Faults end a run cleanly: one line naming the cause (and what to do), a non-zero exit code, nothing
published or overwritten, no rank left running. Real runs of the tiny model; signals are real signals."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from slimpipe.train import TrainConfig, train
from tests.support.train import TINY, read_log

pytestmark = [pytest.mark.dist, pytest.mark.timeout(120)]

FAST = dict(TINY, timeout=6.0, peak_tflops=1.0)  # stale heartbeat after 2 s; no matmul measurement


def _one_line(err: str, *needles: str) -> str:
    """The stderr of a faulted run: one ``slimpipe train`` line (plus the test hook's own, if it fired)."""
    lines = [ln for ln in err.strip().splitlines() if "test hook" not in ln]
    assert len(lines) == 1, f"expected one line, got:\n{err}"
    for needle in needles:
        assert needle in lines[0], err
    return lines[0]


def _children(pid: int) -> list[int]:
    """Child processes of ``pid`` (the ranks), oldest first."""
    kids = [int(x) for task in Path(f"/proc/{pid}/task").iterdir()
            for x in (task / "children").read_text().split()]
    return sorted(kids, key=lambda k: int(Path(f"/proc/{k}/stat").read_text().rsplit(")", 1)[1].split()[19]))


def _gone(pids: list[int], within_s: float) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        states = []
        for pid in pids:
            try:
                states.append(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0])
            except OSError:
                states.append("gone")
        if all(s in ("gone", "Z") for s in states):
            return True
        time.sleep(0.05)
    return False


def _after_step(out: Path, step: int, action) -> threading.Thread:
    """Run ``action()`` from a thread once the run's partial log holds ``step`` records."""
    log = out / "metrics.jsonl.partial"

    def wait() -> None:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if log.exists() and len(log.read_text().splitlines()) >= step:
                action()
                return
            time.sleep(0.02)

    thread = threading.Thread(target=wait, daemon=True)
    thread.start()
    return thread


def _nothing_published(out: Path) -> None:
    assert not (out / "metrics.jsonl").exists() and not (out / "config.json").exists()
    assert (out / "metrics.jsonl.partial").exists()


@pytest.mark.parametrize(("pp", "dead"), [(2, 1), (4, 0)])
def test_killed_rank_ends_the_job_at_once(pp: int, dead: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          capfd: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("SLIMPIPE_FAULT_RANK", str(dead))  # test hook: that rank calls os._exit(13)
    monkeypatch.setenv("SLIMPIPE_FAULT_STEP", "2")
    code = train(TrainConfig(**{**FAST, "out_dir": str(tmp_path), "steps": 4, "pp": pp, "timeout": 30.0}))
    line = _one_line(capfd.readouterr().err, f"rank {dead} exited with code 13",
                     "the last finished step was 1 of 4", "rerun it")
    assert code == 1
    # a closed connection is the failure itself: no wait for the (30 s / 3) heartbeat
    assert float(re.search(r"stopped within ([0-9.]+) s", line).group(1)) < 3.0, line
    _nothing_published(tmp_path)


def test_sigterm_to_the_launcher_stops_every_rank(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    ranks: list[int] = []

    def terminate() -> None:
        ranks.extend(_children(os.getpid()))
        os.kill(os.getpid(), signal.SIGTERM)  # what a scheduler sends; this process is the launcher

    _after_step(tmp_path, 2, terminate)
    code = train(TrainConfig(**{**FAST, "out_dir": str(tmp_path), "steps": 500, "checkpoint_every": 1}))
    assert code == 128 + signal.SIGTERM
    _one_line(capfd.readouterr().err, "stopped by SIGTERM: 2 rank(s) ended within", "continue from step_",
              "with --resume")
    assert len(ranks) == 2 and _gone(ranks, 1.0), "every rank must end with its launcher's signal"
    _nothing_published(tmp_path)
    assert (tmp_path / "checkpoints" / "latest").read_text().startswith("step_")


def test_sigstop_blames_the_stopped_rank(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    _after_step(tmp_path, 2, lambda: os.kill(_children(os.getpid())[1], signal.SIGSTOP))
    t0 = time.monotonic()
    code = train(TrainConfig(**{**FAST, "out_dir": str(tmp_path), "steps": 500}))
    assert code == 1
    _one_line(capfd.readouterr().err, "rank 1 was stopped (process state T", "the launcher killed it",
              "1 other rank(s) [0]")
    assert time.monotonic() - t0 < 60
    _nothing_published(tmp_path)


def test_sigint_in_a_one_process_run(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    _after_step(tmp_path, 2, lambda: os.kill(os.getpid(), signal.SIGINT))  # Ctrl-C
    code = train(TrainConfig(**{**FAST, "out_dir": str(tmp_path), "steps": 500, "local_pipeline": True}))
    assert code == 128 + signal.SIGINT
    _one_line(capfd.readouterr().err, "stopped by SIGINT", "nothing published", "--checkpoint-every N")
    _nothing_published(tmp_path)


def test_sigkill_of_the_launcher_takes_the_ranks_along(tmp_path: Path) -> None:
    argv = ["--model", "tiny", "--data", "synthetic", "--seq-len", "64", "--global-batch", "4", "--threads",
            "1", "--no-progress", "--peak-tflops", "1", "--steps", "500", "--out-dir", str(tmp_path)]
    proc = subprocess.Popen([sys.executable, "-m", "slimpipe", "train", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    try:
        for line in proc.stdout:
            if re.match(r"step +2/", line):
                break
        ranks = _children(proc.pid)
        proc.kill()
        proc.wait(30)
        assert len(ranks) == 2 and _gone(ranks, 2.0), "ranks outlived their SIGKILLed launcher (orphans)"
    finally:
        proc.kill()
        proc.wait(30)
    _nothing_published(tmp_path)


def _strict(path: Path) -> list[dict]:
    """JSON lines as a strict parser reads them (NaN/Infinity are not JSON)."""

    def refuse(name: str) -> None:
        raise ValueError(f"{path}: {name} is not JSON")

    return [json.loads(ln, parse_constant=refuse) for ln in path.read_text().splitlines() if ln.strip()]


def test_nonfinite_loss_stops_or_skips(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """lr = 1e30 makes step 2 non-finite. stop: exit 3 naming the finite checkpoint; skip: the update is not
    applied, the run finishes, rotation (keep 1) still keeps the last checkpoint with a finite loss."""
    base = dict(FAST, lr=1e30, lr_warmup=1, steps=3, checkpoint_every=1, keep_checkpoints=1,
                local_pipeline=True)
    stop = tmp_path / "stop"
    assert train(TrainConfig(**{**base, "out_dir": str(stop)})) == 3
    ck = stop / "checkpoints"
    _one_line(capfd.readouterr().err, "step 2: loss", "not finite", "the update was not applied",
              f"the newest checkpoint with a finite loss is {ck / 'step_000001'}", "lower --lr")
    assert sorted(p.name for p in ck.iterdir()) == ["latest", "step_000001"]
    recs = _strict(stop / "metrics.jsonl.partial")
    assert [r["skipped"] for r in recs] == [False, True] and None in (recs[1]["loss"], recs[1]["grad_norm"])

    skip = tmp_path / "skip"
    assert train(TrainConfig(**{**base, "out_dir": str(skip), "nonfinite": "skip"})) == 0
    recs = _strict(skip / "metrics.jsonl")
    assert [r["skipped"] for r in recs] == [False, True, True]
    ck = skip / "checkpoints"
    assert sorted(p.name for p in ck.iterdir()) == ["latest", "step_000001", "step_000003"]
    assert json.loads((ck / "step_000001" / "trainer_state.json").read_text())["finite"] is True
    assert json.loads((ck / "step_000003" / "trainer_state.json").read_text())["finite"] is False
    assert read_log(skip / "metrics.jsonl")[0]["loss"] == recs[0]["loss"]
