"""Bad input to simulate, show, plan, plot, calibrate and checkpoint: one line naming the fix, exit code 2,
in well under a second, nothing written; and the layout rules the commands share agree with the planner."""

from __future__ import annotations

import io
import json
import os
import time
from pathlib import Path

import pytest

from slimpipe.cli import main
from slimpipe.config import ConfigError, ParallelConfig, load_model
from slimpipe.rules import check_layout, estimated_actions, sequence_problem, tp_problem

SIM = ["--seq-len", "65536", "--global-batch", "8", "--pp", "4", "--slices", "4"]


def _refused(argv: list[str], capsys: pytest.CaptureFixture[str], *needles: str, limit_s: float = 2.0) -> str:
    t0 = time.perf_counter()
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse rejects a malformed flag itself
        code = exc.code
    elapsed = time.perf_counter() - t0
    out, err = capsys.readouterr()
    assert code == 2, err
    assert out == "" and len(err.strip().splitlines()) == 1, f"expected one line, got:\n{out}{err}"
    for needle in needles:
        assert needle in err, err
    assert elapsed < limit_s, f"refusing took {elapsed:.1f} s: it must come before the expensive work"
    return err


@pytest.mark.parametrize(("argv", "needles"), [
    (["--tp", "3"], ["--tp=3 does not divide num_heads=64", "[1, 2, 4, 8]"]),     # 70B: 64 heads
    (["--tp", "64"], ["--tp=64 does not divide num_kv_heads=8"]),
    (["--cp", "3"], ["--seq-len=65536 is not a multiple of n=4 · 2c=6 = 24", "zig-zag"]),
    (["--cp", "2", "--slices", "1", "--seq-len", "4097"], ["--seq-len=4097", "multiple of 4"]),
    (["--schedule", "1f1b", "--slices", "1", "--attn-balance", "2"],
     ["--attn-balance=2 needs --schedule slimpipe"]),
    (["--global-batch", "10000000"], ["~800,000,000 actions", "--max-actions"]),
    (["--slices", "1048576", "--seq-len", "1048576"], ["m=8 n=1048576", "--max-actions"]),
    (["--max-actions", "10"], ["over the 10 limit"]),
    (["--max-actions", "-1"], ["--max-actions=-1 must be ≥ 0"]),
    (["--num-heads", "63", "--num-kv-heads", "9", "--head-dim", "129"], ["head_dim=129 is odd"]),
])
def test_simulate_refuses(argv: list[str], needles: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    _refused(["simulate", *SIM, *argv], capsys, *needles)


def test_show_size_guard_and_override(capsys: pytest.CaptureFixture[str]) -> None:
    _refused(["show", "--pp", "1000", "--microbatches", "100000"], capsys, "~599,600,000 actions",
             "--max-actions")
    _refused(["show", "--pp", "4", "--microbatches", "8", "--max-actions", "100"], capsys,
             "over the 100 limit")
    assert main(["show", "--pp", "4", "--microbatches", "8", "--max-actions", "0"]) == 0  # 0: no limit
    assert estimated_actions(4, 8, 1, 1) == 2 * 4 * 8 + 4 * 3 * 8


@pytest.mark.parametrize("value", ["-0.5", "nan", "2", "1"])
def test_plan_max_offload(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    _refused(["plan", "--seq-len", "64K", "--gpus", "16", "--max-offload", value], capsys, "--max-offload",
             "[0, 1)")


def test_rules_agree_with_the_planner() -> None:
    """What the planner enumerates is exactly what simulate (and train) accept: one rule set."""
    from slimpipe.planner.space import layouts, shapes
    from slimpipe.planner.request import PlanRequest
    from slimpipe.sim.hardware import load_hardware

    model = load_model("llama-70b")
    for t in range(1, 9):  # the planner's t candidates are the tp_problem-free ones
        assert (tp_problem(model, t) is None) == (t in (1, 2, 4, 8))
    req = PlanRequest(model=model, seq_len=24576, gpus=64, global_batch_tokens=24576 * 16,
                      hardware=load_hardware("h800"))
    seen = 0
    for t, c, p, _d, _e in layouts(req):
        for n, v in shapes("slimpipe", req, t, c, p):
            check_layout(model, ParallelConfig(tp=t, cp=c, pp=p, slices=n, vpp=v), req.seq_len)  # no raise
            seen += 1
    assert seen > 0
    for s, n, t, c in [(4097, 1, 1, 2), (65536, 4, 1, 3), (8192, 512, 8, 2), (8192, 3, 1, 1)]:
        problem = sequence_problem(s, n, t, c)
        assert problem is not None
        with pytest.raises(ConfigError, match="--seq-len"):
            check_layout(load_model("llama-7b"), ParallelConfig(tp=t, cp=c, slices=n), s)


@pytest.fixture
def readonly_dir(tmp_path: Path) -> Path:
    """A directory this process cannot create files in (root ignores modes: use /sys then)."""
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        (ro / "probe").write_text("")
    except OSError:
        return ro
    (ro / "probe").unlink()
    for candidate in (Path("/sys"), Path("/proc")):
        try:
            (candidate / "slimpipe-probe").write_text("")
        except OSError:
            return candidate
    pytest.skip("no read-only directory available to this user")


PLOT = ["plot", "--model", "tiny", "--seq-len", "64", "--global-batch", "4", "--pp", "2", "--cost", "uniform"]


def test_plot_outputs_checked_first(tmp_path: Path, readonly_dir: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib")
    _refused([*PLOT, "-o", str(tmp_path / "missing" / "t.png")], capsys, "does not exist")
    _refused([*PLOT, "-o", str(readonly_dir / "t.png")], capsys, "not writable")
    _refused([*PLOT, "-o", str(tmp_path / "t.bmpx")], capsys, "unknown file type '.bmpx'", ".png")
    _refused([*PLOT, "-o", str(tmp_path)], capsys, "is a directory", "out.png")
    _refused([*PLOT, "--no-image", "--trace", str(readonly_dir / "t.json")], capsys, "--trace",
             "not writable")
    _refused([*PLOT, "--no-image"], capsys, "writes nothing")
    png = tmp_path / "t.png"
    png.write_bytes(b"an earlier plot")
    _refused([*PLOT, "-o", str(png)], capsys, "exists", "--overwrite")
    assert png.read_bytes() == b"an earlier plot"
    assert main([*PLOT, "-o", str(png), "--overwrite"]) == 0
    assert png.stat().st_size > 10_000 and capsys.readouterr().out == f"wrote {png}\n"


def test_calibrate_output_checked_before_measuring(tmp_path: Path, readonly_dir: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    base = ["calibrate", "--quick", "--threads", "1"]
    _refused([*base, "-o", str(tmp_path / "missing" / "p.json")], capsys, "does not exist")
    _refused([*base, "-o", str(readonly_dir / "p.json")], capsys, "not writable")
    _refused([*base, "-o", str(tmp_path)], capsys, "is a directory")
    (tmp_path / "p.json").write_text("{}")
    _refused([*base, "-o", str(tmp_path / "p.json")], capsys, "exists", "--overwrite")
    assert (tmp_path / "p.json").read_text() == "{}"


def test_calibrate_progress_is_silent_off_a_terminal() -> None:
    from slimpipe.calibrate.measure import Progress

    stream = io.StringIO()  # not a TTY: a log file or a pipe
    bar = Progress(15, stream=stream)
    for i in range(15):
        bar.step(f"unit {i}")
    bar.close()
    assert stream.getvalue() == ""


def test_profile_with_negative_times_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["simulate", "--model", "tiny", "--seq-len", "64", "--global-batch", "4", "--pp", "2", "--json"]
    doc = _tiny_profile()
    path = tmp_path / "p.json"
    path.write_text(json.dumps(doc))
    assert main([*argv, "--profile", str(path)]) == 0  # the same profile, valid, simulates
    capsys.readouterr()
    doc["profile"]["attn_fwd"]["prefix_s"] = -1e-12
    path.write_text(json.dumps(doc))
    _refused([*argv, "--profile", str(path)], capsys, "profile.attn_fwd.prefix_s=-1e-12",
             "slimpipe calibrate")
    doc["profile"]["attn_fwd"]["prefix_s"] = 1e-11
    doc["profile"]["compose_bwd"] = 0.0
    path.write_text(json.dumps(doc))
    _refused([*argv, "--profile", str(path)], capsys, "profile.compose_bwd=0.0")


def _tiny_profile() -> dict:
    """A complete, valid profile document (what `slimpipe calibrate` writes), built from a preset."""
    from dataclasses import asdict

    from slimpipe.sim.hardware import (
        PROFILE_FORMAT, ActivationFootprint, AttentionTime, CostProfile, GemmProfile, LinearTime,
        load_hardware,
    )

    line = LinearTime(fixed_s=1e-5, per_item_s=1e-11)
    attn = AttentionTime(fixed_s=1e-5, prefix_s=1e-11, diagonal_s=1e-11, masked_diagonal_s=1e-11)
    foot = ActivationFootprint(per_layer=1.0, first_stage=0.0, middle_stage=0.0, last_stage=0.0,
                               kv_per_layer=1.0)
    prof = CostProfile(device="cpu", dtype="float32", dtype_bytes=4, threads=1, model="tiny", model_width=1,
                       gemms=(GemmProfile(in_features=128, out_features=128, fwd=line, bwd=line),),
                       gemm_fwd=line, gemm_bwd=line, attn_fwd=attn, attn_bwd=attn, elementwise_fwd=line,
                       elementwise_bwd=line, embed_fwd=line, embed_bwd=line, loss_fwd=line, loss_bwd=line,
                       compose_fwd=1.0, compose_bwd=1.0, action_fwd_s=0.0, action_bwd_s=0.0,
                       p2p_latency_s=1e-5, p2p_bandwidth=1e9, footprint=foot)
    hw = {k: v for k, v in asdict(load_hardware("h800")).items() if k not in ("name", "profile")}
    return {"format": PROFILE_FORMAT, "hardware": hw, "profile": asdict(prof)}


def test_checkpoint_verify_refuses_a_missing_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _refused(["checkpoint", "verify", str(tmp_path / "nothing")], capsys, "no such directory")
    (tmp_path / "empty").mkdir()
    _refused(["checkpoint", "verify", str(tmp_path / "empty")], capsys, "no step_* checkpoint")
    assert not os.listdir(tmp_path / "empty")
