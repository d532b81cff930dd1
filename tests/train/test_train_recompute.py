"""`slimpipe train --recompute` / `--offload` end to end: same loss curve, less resident activation memory,
and what the trainer reports (metrics.jsonl `peak_activation_bytes` / `peak_offloaded_bytes`, the step
line's `act/stage [...] MiB  offloaded [...] MiB`).

Three real runs through the CLI (2 forked gloo ranks, the tiny preset, 4 slices, 3 steps, fp32, CPU):
no recompute, `--recompute full`, `--offload 0.5 --offload-min-bytes 1024` (the default 1 MiB threshold
is above every saved tensor of the tiny model, so the offloaded figures also show the flag reaches the
runtime). On CPU with one thread both features are bitwise: a full-recompute replay runs the same ops on
the same inputs, and offload copies saved tensors out and back (docs/runtime.md), so the curves must be
identical, not merely close.

Memory (docs/runtime.md "Activation recompute"): without recompute a layer keeps 6h + 2·d_kv + 3f
elements per token, with `full` only the block input h; the K/V store (`peak_kv_bytes`) is the same in
every mode. For the tiny preset (h 128, d_kv 64, f 384) that is 128 / 2048 = 1/16 of the saved part.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from slimpipe.cli import main
from tests.support.train import TINY, losses, read_log

pytestmark = [pytest.mark.dist, pytest.mark.timeout(120)]

STEPS = 3
MIB = 1 << 20
MODES = {
    "none": [],
    "full": ["--recompute", "full"],
    "offload": ["--offload", "0.5", "--offload-min-bytes", "1024"],
}
LINE = re.compile(r"^step +(\d+)/\d+ .* act/stage \[([^\]]*)\] MiB"
                  r"(?:  offloaded \[([^\]]*)\] MiB)?  [\d.]+s$")


def _argv(out: Path, extra: list[str]) -> list[str]:
    """`slimpipe train` flags for tests.support.train.TINY on pp 2 with 4 slices, CPU, + ``extra``."""
    argv = ["train"]
    for key, value in TINY.items():
        flag = "--" + key.replace("_", "-")
        argv += [flag] if value is True else [f"--no-{key}"] if value is False else [flag, str(value)]
    return [*argv, "--pp", "2", "--slices", "4", "--schedule", "slimpipe", "--steps", str(STEPS),
            "--device", "cpu", "--out-dir", str(out), *extra]


def _figures(text: str) -> list[float]:
    return [float(x) for x in text.split(",")]


def test_recompute_and_offload_same_curve_less_memory(tmp_path: Path,
                                                      capfd: pytest.CaptureFixture[str]) -> None:
    recs: dict[str, list[dict]] = {}
    lines: dict[str, list[re.Match]] = {}
    headers: dict[str, str] = {}
    for name, extra in MODES.items():
        out = tmp_path / name
        code = main(_argv(out, extra))
        text = capfd.readouterr().out  # fd level: the step lines come from forked rank 0
        assert code == 0, text[-2000:]
        recs[name] = read_log(out / "metrics.jsonl")
        assert [r["step"] for r in recs[name]] == list(range(1, STEPS + 1))
        lines[name] = [m for m in map(LINE.match, text.splitlines()) if m]
        assert [int(m[1]) for m in lines[name]] == list(range(1, STEPS + 1)), text
        headers[name] = next(x for x in text.splitlines() if x.lstrip().startswith("layout "))

    # The resolved config carries the flags.
    train_cfg = json.loads((tmp_path / "full" / "config.json").read_text())["train"]
    assert train_cfg["recompute"] == "full" and train_cfg["offload"] == 0
    train_cfg = json.loads((tmp_path / "offload" / "config.json").read_text())["train"]
    assert train_cfg["recompute"] == "none" and train_cfg["offload"] == 0.5
    assert train_cfg["offload_min_bytes"] == 1024
    assert "recompute=" not in headers["none"] and "offload=" not in headers["none"]
    assert "recompute=full" in headers["full"] and "offload=0.5" in headers["offload"]

    # Same curve, bitwise (CPU, one thread each): recompute and offload change memory, never the numbers.
    ref = recs["none"]
    for name in ("full", "offload"):
        assert losses(recs[name]) == losses(ref), name
        assert [r["grad_norm"] for r in recs[name]] == [r["grad_norm"] for r in ref], name

    for step in range(STEPS):
        none, full, off = (recs[n][step] for n in MODES)
        kv = none["peak_kv_bytes"]
        assert len(kv) == 2 and full["peak_kv_bytes"] == kv == off["peak_kv_bytes"], "K/V is never dropped"
        saved = [a - k for a, k in zip(none["peak_activation_bytes"], kv, strict=True)]
        assert all(s > 0 for s in saved)

        # Full recompute: the stage keeps the block inputs (h of 6h + 2·d_kv + 3f = 1/16) besides K/V.
        full_saved = [a - k for a, k in zip(full["peak_activation_bytes"], kv, strict=True)]
        assert full["peak_activation_bytes"][0] < 0.25 * none["peak_activation_bytes"][0], (full, none)
        assert 0 < full_saved[0] < 0.1 * saved[0], (full_saved, saved)

        # Offload: host bytes > 0 on stage 0 (its units have ≥ 2 actions between F and B), ≈ α of the
        # saved bytes at most (whole storages, largest first), and less resident than without.
        offloaded = off["peak_offloaded_bytes"]
        assert len(offloaded) == 2 and offloaded[0] > 0, off
        assert offloaded[0] <= 0.6 * saved[0], (offloaded, saved)
        assert off["peak_activation_bytes"][0] < none["peak_activation_bytes"][0], (off, none)
        for name in ("none", "full"):
            assert not any(recs[name][step].get("peak_offloaded_bytes") or []), name

    # The printed step line: resident MiB per stage, and the host MiB only when something was offloaded.
    for name in MODES:
        for m, rec in zip(lines[name], recs[name], strict=True):
            assert _figures(m[2]) == pytest.approx([b / MIB for b in rec["peak_activation_bytes"]], abs=0.051)
            if name == "offload":
                assert m[3] is not None, m[0]
                host = [b / MIB for b in rec["peak_offloaded_bytes"]]
                assert _figures(m[3]) == pytest.approx(host, abs=0.051)
                assert _figures(m[3])[0] > 0
            else:
                assert m[3] is None and "offloaded" not in m[0], m[0]
