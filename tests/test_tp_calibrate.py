"""The TP-collective fit of calibrate: a ring, latency·(T−1) + bytes·(T−1)/T / bandwidth."""

from __future__ import annotations

import pytest

from slimpipe.calibrate.fit import _fit_tp


def test_fit_recovers_a_ring() -> None:
    lat, bw = 3e-4, 2e9
    pts = [{"tp": t, "op": op, "bytes": b, "s": lat * (t - 1) + b * (t - 1) / t / bw}
           for t in (2, 4) for op in ("all_gather", "reduce_scatter") for b in (1 << 15, 1 << 20, 1 << 23)]
    fit = _fit_tp(pts)
    assert fit["tp_latency_s"] == pytest.approx(lat, rel=1e-6) and fit["tp_bandwidth"] == pytest.approx(bw, rel=1e-6)
    assert _fit_tp([]) == {"tp_latency_s": 0.0, "tp_bandwidth": 0.0}
