"""The loss curve does not depend on the parallel layout: same seed, same data, same curve.

Each case is a real `slimpipe train` run (forked gloo ranks, tiny model, 3 steps). The reference is one
process holding the whole model with no slicing. Tolerance: fp32 with a different summation order per
layout (slices split the attention and loss sums, DP splits the batch sum) gives ~1e-7 relative on the
loss; three AdamW steps keep it well under the 1e-6 the issue asks for.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.train import losses, run_training

pytestmark = [pytest.mark.dist, pytest.mark.timeout(240)]

STEPS = 3
LAYOUTS = {
    "pp2-slimpipe-n4": dict(pp=2, slices=4, schedule="slimpipe"),
    "pp4-slimpipe-n8": dict(pp=4, slices=8, schedule="slimpipe"),
    "pp2-vpp2-slimpipe-n4": dict(pp=2, vpp=2, slices=4, schedule="slimpipe"),
    "pp2-dp2-1f1b": dict(pp=2, dp=2, slices=1, schedule="1f1b"),
    "local-pp4-interleaved-1f1b": dict(pp=4, vpp=2, slices=1, schedule="interleaved-1f1b", local_pipeline=True),
}


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """pp = 1, no slicing: the whole model in one process."""
    return run_training(tmp_path_factory.mktemp("ref"), pp=1, slices=1, schedule="slimpipe", steps=STEPS)


@pytest.mark.parametrize("name", LAYOUTS)
def test_same_loss_curve(name: str, reference: list[dict], tmp_path: Path) -> None:
    recs = run_training(tmp_path, steps=STEPS, **LAYOUTS[name])
    assert [r["step"] for r in recs] == [1, 2, 3]
    assert losses(recs) == pytest.approx(losses(reference), rel=1e-6, abs=0)
    assert [r["grad_norm"] for r in recs] == pytest.approx([r["grad_norm"] for r in reference], rel=1e-5)
    pp = LAYOUTS[name]["pp"]
    for r in recs:
        assert len(r["peak_activation_bytes"]) == pp and all(b > 0 for b in r["peak_activation_bytes"])
        assert 0 <= r["bubble_ratio"] < 1 and r["tokens_per_s"] > 0 and r["mfu"] > 0
