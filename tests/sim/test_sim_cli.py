"""`slimpipe simulate | show | plot` end to end: outputs, files, and one-line errors with exit code 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from slimpipe.trace import read_chrome_trace, write_chrome_trace

REPO = Path(__file__).resolve().parents[2]
SMALL = ["--model", "llama-7b", "--seq-len", "32768", "--global-batch", "4", "--tp", "2", "--pp", "4",
         "--slices", "4", "--vpp", "2", "--recompute", "partial+fc1", "--vocab-parallel"]


@pytest.mark.parametrize(("argv", "needle"), [
    (["--schedule", "1f1b", "--slices", "4"], "--schedule slimpipe"),          # n not for this schedule
    (["--pp", "16", "--vpp", "3"], "divisible by pp·vpp"),                            # L % (p·v) != 0
    (["--model", "gpt-9"], "unknown"),                                                # unknown model
    (["--gpus", "64"], "--gpus=64 does not match"),                                   # GPU count mismatch
    (["--dp", "3"], "--global-batch=8 is not a multiple"),                            # B % (b·d) != 0
    (["--pp", "8", "--global-batch", "1", "--slices", "1"], "micro-batches"),  # m too small for warm-up
    (["--gpu", "tpu"], "--gpu 'tpu' is unknown"),
    (["--offload", "1.5"], "--offload"),
    (["--seq-len", "1000", "--slices", "3"], "--seq-len=1000 is not divisible"),
    (["--ep", "2"], "--ep=2 needs an MoE model"),
    (["--tp", "2", "--etp", "1"], "--etp=1 needs an MoE model"),
    (["--tp", "2", "--etp", "4"], "--etp=4 must be 1 or --tp=2"),
    (["--model", "mixtral-8x7b", "--tp", "2", "--dp", "2", "--ep", "4"], "--etp 1"),  # 2·4 ∤ t·c·d = 4
])
def test_bad_arguments_exit_2_with_one_line(argv, needle, cli) -> None:
    base = ["simulate", "--model", "llama-7b", "--seq-len", "8192", "--global-batch", "8", "--pp", "4",
            "--slices", "4"]
    code, out, err = cli(base + argv)
    assert code == 2
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], err


def test_argparse_errors_also_exit_2(cli, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        cli(["simulate", "--seq-len", "8192", "--global-batch", "8", "--schedule", "zb-v"])
    assert exc.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_simulate_table_and_json(simulate_json, cli) -> None:
    got = simulate_json(*SMALL)
    for key in ("step_time_s", "bubble_ratio", "tokens_per_s", "mfu", "mfu_dense", "memory_gib", "ranks"):
        assert key in got
    assert set(got["memory_gib"]) == {"peak", "params_grads", "optimizer", "activations", "output",
                                      "recomputed", "kv_cache", "kv_grad", "offloaded", "exchange"}
    assert 0 < got["mfu"] < got["mfu_dense"] < 1
    assert got["memory_gib"]["peak"] == max(r["memory_gib"]["peak"] for r in got["ranks"])
    assert got["tokens_per_s"] == pytest.approx(4 * 32768 / got["step_time_s"])
    code, out, _ = cli(["simulate", *SMALL])
    assert code == 0 and "bubble" in out and "MFU" in out and "rank" in out


def test_model_override_changes_the_model(simulate_json) -> None:
    base = simulate_json(*SMALL)
    small_vocab = simulate_json(*SMALL, "--vocab-size", "32000")
    assert small_vocab["memory_gib"]["output"] == pytest.approx(base["memory_gib"]["output"] * 32000 / 128256)


def test_expert_tp_flag_reaches_the_memory_model(simulate_json) -> None:
    # Mixtral-8x7B t4 p4 e1: experts sharded over expert-TP = t by default, whole with --etp 1.
    argv = ("--model", "mixtral-8x7b", "--seq-len", "32768", "--global-batch", "4", "--tp", "4", "--pp", "4",
            "--slices", "4", "--vpp", "2")
    sharded, whole = simulate_json(*argv), simulate_json(*argv, "--etp", "1")
    assert (sharded["config"]["etp"], whole["config"]["etp"]) == (4, 1)
    experts = 8 * 3 * 4096 * 14336 * 8 * 6 / 2**30  # 8 layers per rank, 6 B/param, GiB
    diff = whole["memory_gib"]["params_grads"] - sharded["memory_gib"]["params_grads"]
    assert diff == pytest.approx(experts * (1 - 1 / 4))


def test_show_grid_csv_and_lowered(cli) -> None:
    code, out, _ = cli(["show", "--schedule", "slimpipe", "--pp", "4", "--microbatches", "2",
                            "--slices", "8"])
    assert code == 0
    assert "peak in-flight units per rank: 14, 12, 10, 8" in out  # the double warm-up (auto, n > 1)
    rank3 = next(line for line in out.splitlines() if line.startswith("rank3"))
    assert rank3.split()[1:11] == ["3F0.0", "3F0.1", "3F0.2", "3F0.3", "3F0.4", "3F0.5", "3F0.6", "3F0.7",
                                   "3B0.7", "3F1.0"]  # reference §4.2: the last rank's steady state
    code, out, _ = cli(["show", "--schedule", "1f1b", "--pp", "2", "--microbatches", "2", "--lowered",
                            "--csv"])
    assert code == 0
    assert out.splitlines()[1] == "0F0.0,0SEND_F0.0,0F1.0,0SEND_F1.0,0RECV_B0.0,0B0.0,0RECV_B1.0,0B1.0"
    code, _, err = cli(["show", "--schedule", "1f1b", "--slices", "2"])
    assert code == 2 and len(err.strip().splitlines()) == 1


def test_plot_writes_image_and_trace(tmp_path, cli) -> None:
    pytest.importorskip("matplotlib")
    png, trace = tmp_path / "t.png", tmp_path / "t.json"
    argv = ["plot", *SMALL, "--cost", "uniform", "-o", str(png), "--trace", str(trace)]
    code, out, err = cli(argv)
    assert code == 0, err
    assert png.stat().st_size > 10_000
    data = json.loads(trace.read_text())
    xs = [e for e in data["traceEvents"] if e["ph"] == "X"]
    counters = [e for e in data["traceEvents"] if e["ph"] == "C"]
    assert {e["pid"] for e in xs} == {0, 1, 2, 3}
    computes = sum(1 for e in xs if e["name"].lstrip("0123456789")[0] in "FB")
    assert computes == 4 * 4 * 4 * 2 * 2  # p·m·n·v·{F, B}
    assert counters and all("memory_gib" in e["args"] for e in counters)
    # --measured: a trainer-style trace drawn beside the simulation.
    measured = tmp_path / "run.trace.json"
    write_chrome_trace([(0, "0F0.0", 0.0, 0.5, None), (1, "1F0.0", 0.6, 1.0, {"x": 1})], measured)
    assert [e[:4] for e in read_chrome_trace(measured)] == [(0, "0F0.0", 0.0, 0.5), (1, "1F0.0", 0.6, 1.0)]
    code, _, err = cli(["plot", *SMALL, "--cost", "uniform", "-o", str(png), "--overwrite", "--measured",
                        str(measured)])
    assert code == 0, err
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    code, _, err = cli(["plot", *SMALL, "-o", str(png), "--overwrite", "--measured", str(bad)])
    assert code == 2 and "--measured" in err


def test_plot_without_matplotlib_says_how_to_install_it(tmp_path, cli, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ModuleNotFoundError
    code, out, err = cli(["plot", *SMALL, "-o", str(tmp_path / "x.png")])
    assert code == 2 and out == "" and "pip install -e '.[plot]'" in err and "--no-image" in err


def test_plot_zooms_marks_memory_over_the_gpu_and_checks_flags_first(tmp_path, cli) -> None:
    pytest.importorskip("matplotlib")
    from slimpipe.plot import rank_colours

    png = tmp_path / "z.png"
    over = ["--model", "llama-7b", "--seq-len", "65536", "--global-batch", "4", "--pp", "4", "--slices", "4"]
    code, out, err = cli(["plot", *over, "-o", str(png), "--ranks", "0,2-3", "--steps", "2:9"])
    assert code == 0, err
    assert png.stat().st_size > 10_000
    assert "warning: peak 208.6 GiB on rank 0 exceeds the GPU's 80.0 GiB (3 ranks over)" in out
    code, out, err = cli(["plot", *over, "--recompute", "full", "--gpu", "h200", "-o", str(png),
                          "--overwrite"])
    assert code == 0 and "warning" not in out, err  # 92.9 GiB fits an H200's 141 GiB
    for flag, value, needle in (("--ranks", "4", "names rank 4, but --pp=4"), ("--ranks", "a", "ranges"),
                                ("--steps", "9:2", "A:B with integers")):
        target = tmp_path / "never.png"
        code, out, err = cli(["plot", *over, "-o", str(target), flag, value])
        assert code == 2 and needle in err and not target.exists(), err
    for p in (4, 16, 20, 32):  # one distinct colour per rank (the default cycle repeats after 10)
        assert len(set(rank_colours(p))) == p


def test_console_script_runs_a_calibration_style_command() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "slimpipe", "simulate", *SMALL, "--cost", "uniform", "--json"],
        capture_output=True, text=True, cwd=REPO, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    assert got["bubble_ratio"] == pytest.approx(3 / (4 * 4 * 2 + 3))
