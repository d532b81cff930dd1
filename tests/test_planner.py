"""`slimpipe plan` and slimpipe.planner: ranked feasible plans, the closed forms it prunes with, errors."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import pytest

from slimpipe.cli import main
from slimpipe.config import ConfigError, ParallelConfig, load_model
from slimpipe.planner import PlanRequest, _bounded, plan, step_time_bound
from slimpipe.schedule.builders import build
from slimpipe.sim import Workload, evaluate, load_hardware, peak_inflight
from slimpipe.sim.cost import seq1f1b_partition
from slimpipe.sim.evaluate import closed_form_inflight, precheck_memory, weighted_inflight

REPO = Path(__file__).resolve().parents[1]
H800 = load_hardware("h800")
GIB = 2**30
# llama-7b, 32K tokens, 8 GPUs, B = 8: a few hundred layouts, a handful of simulations.
SMALL = ["--model", "llama-7b", "--seq-len", "32K", "--gpus", "8", "--global-batch-tokens", "256K"]


def _cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def small_json() -> list[dict]:
    proc = subprocess.run([sys.executable, "-m", "slimpipe", "plan", *SMALL, "--top", "5", "--json"],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, "--json prints one JSON list"
    return json.loads(lines[0])


def test_plans_are_ranked_fit_in_memory_and_have_the_schema(small_json) -> None:
    assert len(small_json) == 5
    tps = [p["tokens_per_s"] for p in small_json]
    assert tps == sorted(tps, reverse=True)
    for p in small_json:
        for key in ("schedule", "tp", "cp", "pp", "dp", "ep", "slices", "vpp", "recompute", "offload",
                    "vocab_parallel", "exchange", "mfu", "mfu_causal", "tokens_per_s", "bubble_ratio",
                    "peak_memory_gib", "headroom_gib", "microbatches"):
            assert key in p, key
        assert p["tp"] * p["cp"] * p["pp"] * p["dp"] == 8
        assert p["microbatches"] * p["dp"] == 8
        assert p["peak_memory_gib"] <= 80.0
        assert p["headroom_gib"] == pytest.approx(80.0 - p["peak_memory_gib"])
        assert 0 < p["mfu_causal"] < p["mfu"] < 1
        assert p["exchange"] is False


def test_plan_numbers_are_what_simulate_prints(small_json, capsys) -> None:
    best = small_json[0]
    argv = ["simulate", "--model", "llama-7b", "--seq-len", "32768", "--global-batch", "8", "--gpus", "8",
            "--json", "--schedule", best["schedule"], "--recompute", best["recompute"],
            "--offload", str(best["offload"])]
    for flag in ("tp", "cp", "pp", "dp", "ep", "slices", "vpp"):
        argv += [f"--{flag}", str(best[flag])]
    if best["vocab_parallel"]:
        argv.append("--vocab-parallel")
    code, out, err = _cli(argv, capsys)
    assert code == 0, err
    sim = json.loads(out)
    assert sim["tokens_per_s"] == pytest.approx(best["tokens_per_s"], rel=1e-12)
    assert sim["memory_gib"]["peak"] == pytest.approx(best["peak_memory_gib"], rel=1e-12)
    assert sim["bubble_ratio"] == pytest.approx(best["bubble_ratio"], rel=1e-12)


def test_schedule_flag_restricts_the_family_and_table_prints(capsys) -> None:
    code, out, err = _cli(["plan", *SMALL, "--schedule", "interleaved-1f1b", "--vocab-parallel", "off",
                           "--max-offload", "0", "--top", "3", "--json"], capsys)
    assert code == 0, err
    plans = json.loads(out)
    assert plans and {p["schedule"] for p in plans} == {"interleaved-1f1b"}
    assert all(p["vpp"] > 1 and p["slices"] == 1 and p["offload"] == 0 and not p["vocab_parallel"]
               for p in plans)
    code, out, err = _cli(["plan", *SMALL, "--schedule", "interleaved-1f1b", "--top", "2"], capsys)
    assert code == 0, err
    assert "interleaved-1f1b" in out and "MFUc" in out and "reproduce #1: slimpipe simulate" in out


@pytest.mark.parametrize(("argv", "needle"), [
    (["--model", "llama-70b", "--seq-len", "2048K", "--gpus", "8"], "exceed h800's 80.0 GiB"),
    (["--model", "llama-7b", "--seq-len", "32K", "--gpus", "6"], "no layout G = t·c·p·d"),
    (["--model", "gpt-9", "--seq-len", "32K", "--gpus", "8"], "--model 'gpt-9' is unknown"),
    (["--model", "tiny", "--seq-len", "4096", "--gpus", "0"], "--gpus='0' must be a positive integer"),
    (["--model", "tiny", "--seq-len", "4096", "--gpus", "two"], "--gpus='two' must be a positive integer"),
    (["--model", "tiny", "--seq-len", "4096", "--gpus", "2", "--gpu", "tpu"], "--gpu 'tpu' is unknown"),
    (["--model", "tiny", "--seq-len", "4096", "--gpus", "2", "--global-batch-tokens", "1000"],
     "--global-batch-tokens=1000 must be a positive multiple"),
])
def test_bad_or_infeasible_requests_exit_2_with_one_line(argv, needle, capsys) -> None:
    code, out, err = _cli(["plan", *argv], capsys)
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], err


def test_unknown_schedule_is_refused(capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["plan", "--seq-len", "4096", "--gpus", "2", "--schedule", "zb-v"])
    assert exc.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_closed_form_inflight_matches_the_builders() -> None:
    for name, ns, vs in (("gpipe", (1,), (1,)), ("1f1b", (1,), (1,)), ("interleaved-1f1b", (1,), (2, 3)),
                         ("seq1f1b", (2, 3, 8), (1,)), ("slimpipe", (1, 2, 3, 4, 8), (1, 2, 3))):
        for p in (1, 2, 3, 4, 8):
            for m in (1, 2, 3, 5, 8):
                for n in ns:
                    for v in vs:
                        try:
                            ref = build(name, p=p, m=m, n=n, v=v)
                        except ConfigError:
                            with pytest.raises(ConfigError):
                                closed_form_inflight(name, p, m, n, v)
                            continue
                        got = closed_form_inflight(name, p, m, n, v)
                        assert got == (peak_inflight(ref), ref.meta["w"], ref.meta["g"]), (name, p, m, n, v)


def test_weighted_inflight_matches_built_seq1f1b() -> None:
    model = load_model("llama-7b")
    for p in (1, 2, 4):
        for m in (1, 2, 5):
            for n in (2, 4, 8):
                weights = seq1f1b_partition(model, 65536, n, multiple=8)
                try:
                    ref = build("seq1f1b", p=p, m=m, n=n, slice_weights=weights)
                except ConfigError:
                    with pytest.raises(ConfigError):
                        weighted_inflight("seq1f1b", p, m, n, 1, weights)
                    continue
                peaks, w, g = weighted_inflight("seq1f1b", p, m, n, 1, weights)
                assert peaks == pytest.approx(peak_inflight(ref)) and (w, g) == (ref.meta["w"], ref.meta["g"])


CASES = [  # (schedule, t, c, p, d, n, v, recompute, α, vocab-parallel), llama-7b at 16K, B = 8
    ("slimpipe", 2, 2, 2, 1, 4, 2, "partial+fc1", 0.5, True),
    ("slimpipe", 1, 1, 4, 2, 8, 1, "none", 0.0, False),
    ("interleaved-1f1b", 2, 1, 4, 1, 1, 2, "full", 0.0, False),
    ("1f1b", 1, 2, 4, 1, 1, 1, "none", 0.0, True),
    ("seq1f1b", 2, 1, 4, 1, 4, 1, "full", 0.0, False),
    ("gpipe", 1, 1, 2, 4, 1, 1, "partial+fc1", 0.75, True),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c[0])
def test_precheck_equals_simulated_memory_and_bound_is_below_the_simulation(case) -> None:
    name, t, c, p, d, n, v, rec, alpha, vocab = case
    wl = Workload(model=load_model("llama-7b"), seq_len=16384, global_batch=8, recompute=rec, offload=alpha,
                  vocab_parallel=vocab, parallel=ParallelConfig(tp=t, cp=c, pp=p, dp=d, slices=n, vpp=v))
    ev = evaluate(wl, name, hardware=H800)
    pre = precheck_memory(wl, name)
    assert [mb.peak for mb in pre] == pytest.approx([mb.peak for mb in ev.memory], rel=1e-12)
    bound, busy = step_time_bound(wl, name, H800)
    assert busy == pytest.approx(ev.report.busy_s[p - 1])
    assert bound <= ev.report.step_time_s * (1 + 1e-12)


def test_search_finds_the_exhaustive_best() -> None:
    req = PlanRequest(model=load_model("llama-7b"), seq_len=16384, gpus=4, hardware=H800,
                      global_batch_tokens=8 * 16384, top=3, vocab_parallel=(True,), offload=(0.0,),
                      schedules=("1f1b", "interleaved-1f1b", "slimpipe"))
    res = plan(req)
    every = sorted(evaluate(c.workload, c.schedule, hardware=H800).report.tokens_per_s
                   for c in _bounded(req, Counter(), [0.0]))
    assert res.candidates == len(every) > 3 * res.simulated  # the search skipped most candidates
    assert [p.tokens_per_s for p in res.plans] == pytest.approx(every[::-1][:3], rel=1e-12)


def test_planner_imports_without_torch() -> None:
    code = textwrap.dedent("""
        import sys
        sys.modules["torch"] = None
        import slimpipe.planner, slimpipe.commands.plan
        assert not any(k == "torch" or k.startswith("torch.") for k in sys.modules if sys.modules[k])
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert proc.returncode == 0, proc.stderr
