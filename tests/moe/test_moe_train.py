"""`slimpipe train` on an MoE model: the loss curve (cross-entropy + load-balancing loss) does not depend on
the layout — slices, stages, experts spread over data-parallel ranks (--ep) or split over tensor-parallel
ranks (--tp).

fp32, 3 AdamW steps of tiny-moe on the synthetic walk; the reference is one process, no slicing.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.train import losses, run_training

pytestmark = [pytest.mark.dist, pytest.mark.timeout(240)]

STEPS = 3
MOE = dict(model="tiny-moe", steps=STEPS)
LAYOUTS = {
    "pp2-dp2-ep2-slimpipe-n4": dict(pp=2, dp=2, ep=2, slices=4, schedule="slimpipe"),
    "tp2-dp2-ep2-slimpipe-n4": dict(tp=2, pp=1, dp=2, ep=2, slices=4, schedule="slimpipe"),
}


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    return run_training(tmp_path_factory.mktemp("ref"), pp=1, slices=1, schedule="slimpipe", **MOE)


@pytest.mark.parametrize("name", LAYOUTS)
def test_same_moe_loss_curve(name: str, reference: list[dict], tmp_path: Path) -> None:
    recs = run_training(tmp_path, **MOE, **LAYOUTS[name])
    assert losses(recs) == pytest.approx(losses(reference), rel=1e-5, abs=0)
    assert [r["grad_norm"] for r in recs] == pytest.approx([r["grad_norm"] for r in reference], rel=1e-4)
