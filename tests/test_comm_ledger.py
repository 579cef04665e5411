"""CommLedger's measure on hand-sized collectives (2 gloo ranks): what each rank sends and
receives, independent of the estimate it is compared with elsewhere."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol

from moefn.analyse.ledger import CommLedger, Traffic
from tests.ranks import RankPool


def _collectives(rank: int, world: int) -> dict[str, tuple[int, int, int]]:
    group = dist.new_group([0, 1])
    shard = torch.ones(3)  # 12 bytes
    with CommLedger() as ledger:
        dist.all_gather_into_tensor(torch.empty(6), shard, group=group)
        funcol.wait_tensor(funcol.all_gather_single(shard, 0, group))
        dist.reduce_scatter_tensor(torch.empty(3), torch.ones(6), group=group)
        dist.all_reduce(torch.ones(5), group=group)  # 20 bytes
        # rank 0 keeps 1 row and sends 3; rank 1 keeps 2 and sends 1 (rows of 2 int64)
        send = [1, 3] if rank == 0 else [1, 2]
        recv = [1, 1] if rank == 0 else [3, 2]
        out = torch.empty(sum(recv), 2, dtype=torch.int64)
        dist.all_to_all_single(out, torch.zeros(sum(send), 2, dtype=torch.int64), recv, send,
                               group=group)
        dist.broadcast(torch.ones(4), src=0, group=group)  # 16 bytes from rank 0
    dist.destroy_process_group(group)
    totals = ledger.by_kind()
    assert set(ledger.totals()) == {(kind, (0, 1)) for kind in totals}
    return {kind: (t.calls, t.sent, t.received) for kind, t in totals.items()}


def test_each_rank_counts_what_it_sends_and_receives(ranks: Callable[[int], RankPool]) -> None:
    first, second = ranks(2).run(_collectives)
    assert first == {"all_gather": (2, 24, 24), "reduce_scatter": (1, 12, 12),
                     "all_reduce": (1, 20, 20), "all_to_all": (1, 48, 16),
                     "broadcast": (1, 16, 0)}
    assert second == {**first, "all_to_all": (1, 16, 48), "broadcast": (1, 0, 16)}


def test_traffic_adds_up() -> None:
    assert Traffic(1, 2, 3) + Traffic(4, 5, 6) == Traffic(5, 7, 9)
