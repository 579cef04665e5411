from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import torch

from tests.ranks import RankPool

torch.set_num_threads(1)  # rank pools share the cores with this process


@pytest.fixture(scope="session")
def ranks() -> Iterator[Callable[[int], RankPool]]:
    """``ranks(4).run(fn, *args)``: one reusable gloo pool per world size for the session."""
    pools: dict[int, RankPool] = {}

    def get(world_size: int) -> RankPool:
        if world_size not in pools:
            pools[world_size] = RankPool(world_size)
        return pools[world_size]

    yield get
    for pool in pools.values():
        pool.close()
