"""--doc-lengths: the simulator and planner price packed documents' attention as document-causal."""

from __future__ import annotations

import pytest

from slimpipe.config import ConfigError
from slimpipe.sim.documents import DocLengths, expected_slice_pairs, parse_doc_lengths

BASE = ("--model", "llama-13b", "--seq-len", "65536", "--global-batch", "16", "--tp", "8", "--pp", "4",
        "--slices", "8")


def test_one_endless_document_is_the_causal_sequence(simulate_json) -> None:
    plain = simulate_json(*BASE)
    endless = simulate_json(*BASE, "--doc-lengths", str(10**15))
    assert endless["config"]["attention_work_ratio"] == 1.0
    assert endless["step_time_s"] == pytest.approx(plain["step_time_s"], rel=1e-12)
    assert endless["mfu"] == pytest.approx(plain["mfu"], rel=1e-12)


def test_short_documents_shrink_late_slices(simulate_json) -> None:
    """4K-token documents in 64K rows: slice j's causal work grows with j, the documents' does not; the step
    gets faster and the late slices' share of the work flattens."""
    plain = simulate_json(*BASE)
    docs = simulate_json(*BASE, "--doc-lengths", "4096")
    pairs, causal = docs["config"]["attention_pairs_per_slice"], docs["config"]["causal_pairs_per_slice"]
    assert causal[-1] / causal[0] == pytest.approx(15.0)  # (7.5 b²) / (b²/2)
    assert max(pairs) / min(pairs) < 1.5 < causal[-1] / causal[0]
    assert docs["config"]["attention_work_ratio"] < 0.2
    assert docs["step_time_s"] < plain["step_time_s"]


def test_expected_pairs_of_fixed_length_documents() -> None:
    """Documents of one length L, rows starting at a uniformly random point of a document: the sampled
    mean of Σ L_i²/2 over a row matches the exact expectation (the first document cut uniformly, the last
    cut at s)."""
    L, s = 100, 400
    (pre, diag), = expected_slice_pairs(DocLengths("x", (L,), (1.0,)), [0, s], rows=4000, seed=1)
    assert pre == 0
    # first document: r ~ U{1..L} tokens, then full documents, the last cut at s
    exact = sum(_row_diag(r, L, s) for r in range(1, L + 1)) / L
    assert diag == pytest.approx(exact, rel=0.02)


def _row_diag(first: int, L: int, s: int) -> float:
    lengths, pos = [first], first
    while pos < s:
        lengths.append(min(L, s - pos))
        pos += L
    return sum(n * n for n in lengths) / 2


@pytest.mark.parametrize("spec", ["", "abc", "0", "512:-1", "@/nonexistent/file"])
def test_bad_doc_lengths_are_one_line(spec: str, cli) -> None:
    with pytest.raises(ConfigError, match="--doc-lengths"):
        parse_doc_lengths(spec)
    code, out, err = cli(["simulate", *BASE, "--doc-lengths", spec or ","])
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1


def test_doc_lengths_refuse_the_exchange(cli) -> None:
    code, _, err = cli(["simulate", *BASE, "--doc-lengths", "4096", "--attn-balance", "2"])
    assert code == 2 and "--attn-balance" in err
    code, _, err = cli(["plan", "--model", "llama-13b", "--seq-len", "65536", "--gpus", "32",
                        "--doc-lengths", "4096", "--exchange", "on"])
    assert code == 2 and "--exchange" in err


def test_plan_with_doc_lengths(cli) -> None:
    """The planner prices the candidates' attention document-causally: 4K-token documents in 32K rows make
    the best plan faster than for one causal sequence."""
    import json

    best = []
    for extra in ([], ["--doc-lengths", "4096"]):
        code, out, err = cli(["plan", "--model", "llama-7b", "--seq-len", "32K", "--gpus", "4",
                              "--global-batch-tokens", "128K", "--schedule", "slimpipe", "--top", "1",
                              "--max-simulations", "1", "--json", "--quiet", *extra])
        assert code == 0, err
        best.append(json.loads(out)[0]["tokens_per_s"])
    assert best[1] > 1.5 * best[0]
