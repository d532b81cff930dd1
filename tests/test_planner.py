"""`slimpipe plan` and slimpipe.planner: ranked feasible plans, the closed forms it prunes with, errors."""

from __future__ import annotations

import dataclasses
import io
import json
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import pytest

from slimpipe.cli import main
from slimpipe.config import ConfigError, ParallelConfig, load_model
from slimpipe.planner import PlanRequest, exchange_applies, exchange_time_bound, plan, step_time_bound
from slimpipe.planner.search import _bounded
from slimpipe.schedule.builders import build
from slimpipe.schedule.exchange import exchanges
from slimpipe.sim import Workload, evaluate, load_hardware, peak_inflight
from slimpipe.sim.flops import seq1f1b_partition
from slimpipe.sim.evaluate import closed_form_inflight, precheck_memory, weighted_inflight
from slimpipe.sim.exchange import exchange_buffer_bound

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
                    "vocab_parallel", "exchange", "slice_split", "mfu", "mfu_dense", "tokens_per_s", "bubble_ratio",
                    "peak_memory_gib", "headroom_gib", "microbatches"):
            assert key in p, key
        assert p["tp"] * p["cp"] * p["pp"] * p["dp"] == 8
        assert p["microbatches"] * p["dp"] == 8
        assert p["peak_memory_gib"] <= 80.0
        assert p["headroom_gib"] == pytest.approx(80.0 - p["peak_memory_gib"])
        assert 0 < p["mfu"] < p["mfu_dense"] < 1
        assert isinstance(p["exchange"], bool)
        assert not p["exchange"] or exchange_applies(p["schedule"], p["pp"], p["slices"])


def _check_against_simulate(plan_: dict, workload: list[str], capsys) -> None:
    """`slimpipe simulate` with the plan's flags prints the plan's numbers."""
    argv = ["simulate", *workload, "--json", "--schedule", plan_["schedule"], "--recompute", plan_["recompute"],
            "--offload", str(plan_["offload"]), "--slice-split", plan_["slice_split"]]
    for flag in ("tp", "cp", "pp", "dp", "ep", "slices", "vpp"):
        argv += [f"--{flag}", str(plan_[flag])]
    if plan_["vocab_parallel"]:
        argv.append("--vocab-parallel")
    if plan_["exchange"]:
        argv += ["--attn-balance", str(plan_["slices"])]
    code, out, err = _cli(argv, capsys)
    assert code == 0, err
    sim = json.loads(out)
    assert sim["tokens_per_s"] == pytest.approx(plan_["tokens_per_s"], rel=1e-12)
    assert sim["memory_gib"]["peak"] == pytest.approx(plan_["peak_memory_gib"], rel=1e-12)
    assert sim["bubble_ratio"] == pytest.approx(plan_["bubble_ratio"], rel=1e-12)
    assert ("exchanges_f" in sim["config"]) == plan_["exchange"]


def test_plan_numbers_are_what_simulate_prints(small_json, capsys) -> None:
    workload = ["--model", "llama-7b", "--seq-len", "32768", "--global-batch", "8", "--gpus", "8"]
    _check_against_simulate(small_json[0], workload, capsys)


# A 13-layer llama-1b on 13 GPUs at s = 13·16381 (16381 prime), B = 4: the only layouts are t1 c1 p13 d1
# (13 is prime, B not a multiple of 13) with n = 13, v = 1 for slimpipe. Few slices over 13 ranks leave a
# large causal imbalance, which the exchange evens out: the case where it pays in the simulator.
EXCHANGE_SEQ = 13 * 16381


@pytest.fixture(scope="module")
def model13(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("model") / "llama-1b-13.json"
    fields = dataclasses.asdict(load_model("llama-1b", num_layers=13))
    path.write_text(json.dumps({**fields, "name": "llama-1b-13"}))
    return str(path)


def _exchange_plans(model13: str, capsys, *extra: str) -> list[dict]:
    code, out, err = _cli(["plan", "--model", model13, "--seq-len", str(EXCHANGE_SEQ), "--gpus", "13",
                           "--global-batch-tokens", str(4 * EXCHANGE_SEQ), "--schedule", "slimpipe", "--json",
                           *extra], capsys)
    assert code == 0, err
    return json.loads(out)


def test_exchange_wins_is_reported_and_matches_simulate(model13, capsys) -> None:
    plans = _exchange_plans(model13, capsys, "--slice-split", "equal")  # the exchange needs equal slices
    best = plans[0]
    assert best["exchange"] is True and (best["pp"], best["slices"], best["vpp"]) == (13, 13, 1)
    assert {p["exchange"] for p in plans} == {True, False}
    _check_against_simulate(best, ["--model", model13, "--seq-len", str(EXCHANGE_SEQ), "--global-batch", "4",
                                   "--gpus", "13"], capsys)
    off = _exchange_plans(model13, capsys, "--exchange", "off", "--slice-split", "equal")
    assert off and not any(p["exchange"] for p in off)
    assert best["tokens_per_s"] > off[0]["tokens_per_s"]  # the same layout without exchange is slower
    on = _exchange_plans(model13, capsys, "--exchange", "on")
    assert on and all(p["exchange"] and p["slice_split"] == "equal" for p in on) and on[0] == best
    both = _exchange_plans(model13, capsys)  # equal and equal-FLOP slices: a superset of the search above
    assert {p["slice_split"] for p in both} == {"equal", "equal-flop"}
    assert both[0]["tokens_per_s"] >= best["tokens_per_s"]
    assert all(p["slice_split"] == "equal" for p in both if p["exchange"])
    flop = next(p for p in both if p["slice_split"] == "equal-flop")
    _check_against_simulate(flop, ["--model", model13, "--seq-len", str(EXCHANGE_SEQ), "--global-batch", "4",
                                   "--gpus", "13"], capsys)
    code, out, err = _cli(["plan", "--model", model13, "--seq-len", str(EXCHANGE_SEQ), "--gpus", "13",
                           "--global-batch-tokens", str(4 * EXCHANGE_SEQ), "--schedule", "slimpipe",
                           "--slice-split", "equal", "--top", "2"], capsys)
    assert code == 0, err
    rows = [line.split() for line in out.splitlines() if line.startswith(" 1 ")]
    assert rows and rows[0][13] == "on", out  # the xchg column
    assert f"--attn-balance {best['slices']}" in out  # the reproduce line


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
    assert "interleaved-1f1b" in out and "dense%" in out and "reproduce #1: slimpipe simulate" in out
    assert err == ""  # stderr is not a terminal here: no progress line in logs or pipes


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("quiet", [False, True])
def test_plan_shows_progress_on_a_terminal_unless_quiet(quiet, monkeypatch, capsys) -> None:
    term = _Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    argv = ["plan", *SMALL, "--schedule", "interleaved-1f1b", "--top", "1"] + (["--quiet"] if quiet else [])
    assert main(argv) == 0
    shown = term.getvalue()
    if quiet:
        assert shown == ""
    else:  # the first status is drawn at once, and the line is wiped before the table is printed
        assert shown.startswith("\rplan ") and "candidates fit" in shown and shown.endswith("\r")
    assert "reproduce #1" in capsys.readouterr().out


@pytest.mark.parametrize(("argv", "needle"), [
    (["--model", "llama-70b", "--seq-len", "2048K", "--gpus", "8"], "exceed h800's 80.0 GiB"),
    (["--model", "llama-7b", "--seq-len", "32K", "--gpus", "6"], "no layout G = t·c·p·d"),
    (["--model", "llama-7b", "--seq-len", "32K", "--gpus", "8", "--schedule", "1f1b", "--exchange", "on"],
     "cannot use --exchange on (slimpipe with n > 1 and p > 1 only)"),
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


@pytest.mark.parametrize("field", ["exchange", "vocab_parallel"])
@pytest.mark.parametrize("value", [(), ("on",)])
def test_request_refuses_empty_or_non_boolean_settings(field, value) -> None:
    with pytest.raises(ConfigError, match=f"{field}=.* must be a non-empty tuple of booleans"):
        PlanRequest(model=load_model("tiny"), seq_len=4096, gpus=2, hardware=H800, **{field: value})


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
                        assert got == (peak_inflight(ref), ref.meta.w, ref.meta.g), (name, p, m, n, v)


@pytest.mark.parametrize("name", ["seq1f1b", "slimpipe", "gpipe"])
def test_weighted_inflight_matches_the_built_schedules(name) -> None:
    model = load_model("llama-7b")
    for p in (1, 2, 4):
        for m in (1, 2, 5):
            for n in (2, 4, 8):
                weights = seq1f1b_partition(model, 65536, n, multiple=8)
                for v in ((1,) if name == "seq1f1b" else (1, 2, 3)):
                    try:
                        ref = build(name, p=p, m=m, n=n, v=v, slice_weights=weights)
                    except ConfigError:
                        with pytest.raises(ConfigError):
                            weighted_inflight(name, p, m, n, v, weights)
                        continue
                    peaks, w, g = weighted_inflight(name, p, m, n, v, weights)
                    assert peaks == pytest.approx(peak_inflight(ref)), (p, m, n, v)
                    assert (w, g) == (ref.meta.w, ref.meta.g)


CASES = [  # (schedule, t, c, p, d, n, v, recompute, α, vocab-parallel[, split]), llama-7b at 16K, B = 8
    ("slimpipe", 2, 2, 2, 1, 4, 2, "partial+fc1", 0.5, True),
    ("slimpipe", 2, 2, 2, 1, 4, 2, "partial+fc1", 0.5, True, "equal-flop"),
    ("slimpipe", 1, 1, 4, 2, 8, 1, "full", 0.0, False, "equal-flop"),
    ("slimpipe", 1, 1, 4, 2, 8, 1, "none", 0.0, False),
    ("interleaved-1f1b", 2, 1, 4, 1, 1, 2, "full", 0.0, False),
    ("1f1b", 1, 2, 4, 1, 1, 1, "none", 0.0, True),
    ("seq1f1b", 2, 1, 4, 1, 4, 1, "full", 0.0, False),
    ("gpipe", 1, 1, 2, 4, 1, 1, "partial+fc1", 0.75, True),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c[:1] + c[10:])))
def test_precheck_equals_simulated_memory_and_bound_is_below_the_simulation(case) -> None:
    name, t, c, p, d, n, v, rec, alpha, vocab, *rest = case
    split = rest[0] if rest else "auto"
    wl = Workload(model=load_model("llama-7b"), seq_len=16384, global_batch=8, recompute=rec, offload=alpha,
                  vocab_parallel=vocab, parallel=ParallelConfig(tp=t, cp=c, pp=p, dp=d, slices=n, vpp=v))
    ev = evaluate(wl, name, hardware=H800, slice_split=split)
    assert (ev.schedule.slice_weights is not None) == (split == "equal-flop" or name == "seq1f1b")
    pre = precheck_memory(wl, name, split)
    assert [mb.peak for mb in pre] == pytest.approx([mb.peak for mb in ev.memory], rel=1e-12)
    bound, busy = step_time_bound(wl, name, H800, split)
    assert busy == pytest.approx(ev.report.busy_s[p - 1])
    assert bound <= ev.report.step_time_s * (1 + 1e-12)


EXCHANGE_CASES = [  # (t, c, p, d, n, v, vocab-parallel), slimpipe, llama-7b at 64K, B = 8
    (1, 1, 8, 1, 8, 1, False), (2, 2, 2, 1, 4, 2, True), (1, 2, 4, 1, 4, 4, True), (1, 1, 4, 2, 8, 2, False),
]


@pytest.mark.parametrize("case", EXCHANGE_CASES, ids=str)
def test_exchange_bound_counts_every_rank_and_stays_below_the_simulation(case) -> None:
    t, c, p, d, n, v, vocab = case
    wl = Workload(model=load_model("llama-7b"), seq_len=65536, global_batch=8, recompute="full",
                  vocab_parallel=vocab, parallel=ParallelConfig(tp=t, cp=c, pp=p, dp=d, slices=n, vpp=v))
    plain = evaluate(wl, "slimpipe", hardware=H800).report
    ev = evaluate(wl, "slimpipe", hardware=H800, attn_balance=n)
    assert exchanges(ev.schedule), "the case must exchange something"
    # The memory model counts the exchange buffers, below the planner's bound of them.
    extra = [x.exchange for x in ev.memory]
    assert 0 < max(extra) <= exchange_buffer_bound(wl)
    assert [x.peak - x.exchange for x in ev.memory] == pytest.approx([x.peak for x in plain.memory], rel=1e-12)
    bound = exchange_time_bound(wl, "slimpipe", H800)
    # The exchange only moves or adds work: the mean of the unexchanged busy times is a floor.
    assert sum(plain.busy_s) / p + plain.dp_sync_s <= bound * (1 + 1e-12)
    assert bound <= ev.report.step_time_s * (1 + 1e-12)


@pytest.mark.parametrize("which", ["llama-7b", "exchange"])
def test_search_finds_the_exhaustive_best(which) -> None:
    if which == "llama-7b":  # many candidates: the search must skip most of them
        req = PlanRequest(model=load_model("llama-7b"), seq_len=16384, gpus=4, hardware=H800,
                          global_batch_tokens=8 * 16384, top=3, vocab_parallel=(True,), offload=(0.0,),
                          schedules=("1f1b", "interleaved-1f1b", "slimpipe"))
    else:  # the 13-layer case where the exchange wins
        req = PlanRequest(model=load_model("llama-1b", num_layers=13), seq_len=EXCHANGE_SEQ, gpus=13,
                          hardware=H800, global_batch_tokens=4 * EXCHANGE_SEQ, top=3)
    res = plan(req)
    every = sorted((evaluate(c.workload, c.schedule, hardware=H800, slice_split=c.split,
                             attn_balance=c.workload.parallel.slices if c.exchange else 0).report.tokens_per_s
                    for c in _bounded(req, Counter(), [0.0])), reverse=True)
    assert res.candidates == len(every)
    assert res.exchange_candidates > 0
    if which == "llama-7b":
        assert res.candidates > 3 * res.simulated
    assert [p.tokens_per_s for p in res.plans] == pytest.approx(every[:3], rel=1e-12)


def test_planner_imports_without_torch() -> None:
    code = textwrap.dedent("""
        import sys
        sys.modules["torch"] = None
        import slimpipe.planner, slimpipe.commands.plan
        assert not any(k == "torch" or k.startswith("torch.") for k in sys.modules if sys.modules[k])
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert proc.returncode == 0, proc.stderr
