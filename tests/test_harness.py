from __future__ import annotations

import os
import time
from collections.abc import Callable

import pytest
import torch
import torch.distributed as dist

from moefn.plan.options import CPOptions, EPOptions, FSDPOptions
from tests.parity import Case, run_parity
from tests.ranks import RankFailure, RankPool


def _sum_ranks(rank: int, world_size: int, scale: int) -> int:
    t = torch.tensor([rank * scale])
    dist.all_reduce(t)
    return int(t.item())


def _fail_on_rank_one(rank: int, world_size: int) -> None:
    if rank == 1:
        raise ValueError("boom")


def _sleep(rank: int, world_size: int, seconds: float) -> None:
    time.sleep(seconds)


def test_pool_runs_collectives_and_reports_failures(ranks: Callable[[int], RankPool]) -> None:
    pool = ranks(2)
    assert pool.run(_sum_ranks, 3) == [3, 3]
    with pytest.raises(RankFailure, match="boom"):
        pool.run(_fail_on_rank_one)
    assert pool.run(_sum_ranks, 1) == [1, 1]  # a fresh pool after the failure


def test_a_hung_case_is_named_and_the_pool_restarts() -> None:
    pool = RankPool(2, timeout=1.0)
    try:
        with pytest.raises(RankFailure, match=r"(?s)test_a_hung_case_is_named.*_sleep\(30\).*"
                                              r"rank 0: no answer within 1 s"):
            pool.run(_sleep, 30)
        pool.timeout = 120.0  # room for a fresh pool's start on a busy machine
        assert pool.run(_sum_ranks, 1) == [1, 1]  # the stuck ranks were replaced
    finally:
        pool.close()


def _threads(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def test_workers_do_not_accumulate_threads(ranks: Callable[[int], RankPool]) -> None:
    """Every realize creates gloo groups, each with its own threads; the pool must free them
    after each case (else hundreds of idle threads per worker load the machine): the same
    workers run three cases without being replaced, and end with the threads they had after
    the first."""
    pool = ranks(4)
    pool.close()  # fresh workers: an earlier test file's case may have left threads behind
    case = Case(mesh="dp_shard=2,cp=2,ep=2", steps=1,
                stages=(CPOptions(), EPOptions(), FSDPOptions(precision="fp32")))
    pool.run(run_parity, case)
    pids, first = pool.pids, [_threads(pid) for pid in pool.pids]
    for _ in range(2):
        pool.run(run_parity, case)
    assert pool.pids == pids, "workers were replaced: they held too many threads after a case"
    counts = {pid: _threads(pid) for pid in [os.getpid(), *pids]}
    assert [counts[pid] for pid in pids] == first and max(counts.values()) <= 100, (first, counts)
