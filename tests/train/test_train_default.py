"""The embedded default (`slimpipe train` with no flags), shortened: same code path, 2 short steps.

Also the torchrun launch path, once, as a subprocess (torchrun's own start-up costs ~5 s).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from slimpipe.cli import main
from slimpipe.schedule.actions import parse_action
from slimpipe.train.config import TrainConfig, load_config_file
from tests.support.train import read_log

pytestmark = [pytest.mark.dist, pytest.mark.timeout(240)]

KEYS = {"step", "loss", "grad_norm", "tokens_per_s", "step_time_s", "mfu", "bubble_ratio", "peak_activation_bytes"}


def test_default_run_shortened(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    argv = ["train", "--seq-len", "256", "--steps", "2", "--out-dir", str(out), "--threads", "1",
            "--trace", str(out / "run.trace.json")]
    assert main(argv) == 0
    text = capfd.readouterr().out  # fd level: the step lines come from a forked rank
    assert "small (6.4M params" in text and "stdlib" in text and "slices=4 schedule=slimpipe" in text
    recs = read_log(out / "metrics.jsonl")
    assert [r["step"] for r in recs] == [1, 2] and all(KEYS <= set(r) for r in recs)
    assert recs[1]["loss"] < recs[0]["loss"] - 0.3, "the default run's loss must fall visibly"
    assert all(len(r["peak_activation_bytes"]) == 2 for r in recs)
    resolved = json.loads((out / "config.json").read_text())
    assert resolved["train"]["model"] == "small" and resolved["train"]["seq_len"] == 256
    assert resolved["derived"]["world"] == 2 and resolved["model"]["hidden"] == 256
    # the resolved config is itself a valid --config file
    assert TrainConfig(**load_config_file(str(out / "config.json"))) == TrainConfig(**resolved["train"])
    trace = json.loads((out / "run.trace.json").read_text())["traceEvents"]
    done = [e for e in trace if e["ph"] == "X"]
    assert {e["pid"] for e in done} == {0, 1}
    assert all(parse_action(e["name"]).stage % 2 == e["pid"] for e in done), "row = rank running the action"


@pytest.mark.slow
def test_under_torchrun(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("SLIMPIPE_FAULT_RANK", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "slimpipe", "train", "--model", "tiny", "--data", "synthetic", "--seq-len", "64",
           "--steps", "2", "--out-dir", str(tmp_path), "--no-progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env, cwd=tmp_path)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-2000:]}\nstderr:\n{proc.stderr[-4000:]}"
    assert proc.stdout.count("step ") >= 2 and "2 process(es)" in proc.stdout
    assert [r["step"] for r in read_log(tmp_path / "metrics.jsonl")] == [1, 2]
