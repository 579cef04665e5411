from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.distributed as dist

from tests.ranks import RankFailure, RankPool


def _sum_ranks(rank: int, world_size: int, scale: int) -> int:
    t = torch.tensor([rank * scale])
    dist.all_reduce(t)
    return int(t.item())


def _fail_on_rank_one(rank: int, world_size: int) -> None:
    if rank == 1:
        raise ValueError("boom")


def test_pool_runs_collectives_and_reports_failures(ranks: Callable[[int], RankPool]) -> None:
    pool = ranks(2)
    assert pool.run(_sum_ranks, 3) == [3, 3]
    with pytest.raises(RankFailure, match="boom"):
        pool.run(_fail_on_rank_one)
    assert pool.run(_sum_ranks, 1) == [1, 1]  # a fresh pool after the failure
