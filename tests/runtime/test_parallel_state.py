"""ParallelState: the (dp, cp, pp, tp) mesh's rank order and every group's members, on 8 gloo ranks."""

from __future__ import annotations

import itertools

import pytest
import torch.distributed as dist

from tests.support.dist import run_dist
from slimpipe.runtime import ParallelState

pytestmark = pytest.mark.dist
GROUPS = ("dp", "cp", "pp", "tp", "dp_cp", "pp_tp", "fwd", "bwd", "exchange", "vocab")


def _worker(rank: int, world: int, layouts: list[dict]) -> list:
    out = []
    for kw in layouts:
        s = ParallelState.create(timeout_s=30.0, **kw)
        ranks = {n: dist.get_process_group_ranks(getattr(s, f"{n}_group")) for n in GROUPS}
        embed = dist.get_process_group_ranks(s.embed_group) if s.embed_group is not None else None
        out.append(((s.dp_rank, s.cp_rank, s.pp_rank, s.tp_rank), ranks, embed, s.global_rank(0)))
    return out


LAYOUTS = [dict(pp=2, tp=2), dict(pp=2, tp=2, cp=2), dict(pp=4, tp=2), dict(pp=2, tp=4), dict(pp=8)]


@pytest.mark.timeout(60)
def test_rank_order_and_groups() -> None:
    """rank = ((dp·c + cp)·p + pp)·t + tp; each group holds exactly the ranks that differ from this one
    in its axes only."""
    results = run_dist(_worker, 8, LAYOUTS)
    for i, kw in enumerate(LAYOUTS):
        t, c, p = kw.get("tp", 1), kw.get("cp", 1), kw["pp"]
        d = 8 // (t * c * p)
        grid = {coord: ((coord[0] * c + coord[1]) * p + coord[2]) * t + coord[3]
                for coord in itertools.product(range(d), range(c), range(p), range(t))}
        for rank in range(8):
            coord, ranks, embed, first = results[rank][i]
            assert grid[coord] == rank, (kw, rank, coord)

            def members(free: str, coord=coord) -> list[int]:
                axes = "dp cp pp tp".split()
                return sorted(r for k, r in grid.items()
                              if all(k[a] == coord[a] for a, name in enumerate(axes) if name not in free))

            expect = {"dp": members("dp"), "cp": members("cp"), "pp": members("pp"), "tp": members("tp"),
                      "dp_cp": members("dp cp"), "pp_tp": members("pp tp")}
            expect |= {ch: expect["pp"] for ch in ("fwd", "bwd", "exchange", "vocab")}
            assert ranks == expect, (kw, rank)
            assert first == expect["pp"][0]
            ends = [expect["pp"][0], expect["pp"][-1]]
            assert embed == (ends if p > 1 and rank in ends else None), (kw, rank)


def _bad(rank: int, world: int) -> None:
    ParallelState.create(pp=2, tp=3, timeout_s=10.0)


@pytest.mark.timeout(30)
def test_world_mismatch_names_the_flags() -> None:
    with pytest.raises(Exception, match=r"tp·cp·pp·dp = 3·1·2·\? must equal the world size 2: fix --tp"):
        run_dist(_bad, 2)
