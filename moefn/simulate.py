"""Realize a plan for a few representative ranks of a big world inside one process.

Uses torch's fake process group on a meta-device model (no memory, no communication): each
simulated rank runs the real `realize` (DTensor + fully_shard) and every parameter's local shape
is checked against the plan's symbolic layout. A fake group simulates one rank per process, so
we realize the first rank, the last, and one in the middle of an EP group.

>>> report = simulate(plan, lambda: MoETransformer(get_preset("deepseek-v3")))   # doctest: +SKIP
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

import torch
import torch.distributed as dist
from attrs import frozen
from torch import nn
from torch.distributed.tensor import DTensor

from moefn.errors import PlanError, Problem
from moefn.layout import local_shape, param_layouts
from moefn.mesh import MeshSpec
from moefn.plan import ShardPlan


def representative_ranks(mesh: MeshSpec) -> tuple[int, ...]:
    """First rank, last rank, and a rank in the middle of an EP group halfway through."""
    middle = (mesh.world_size // 2) // mesh.ep * mesh.ep + mesh.ep // 2
    return tuple(sorted({0, mesh.world_size - 1, min(middle, mesh.world_size - 1)}))


@frozen(kw_only=True)
class SimulatedRank:
    rank: int
    seconds: float
    parameters: int


def _simulate_rank(plan: ShardPlan, build_model: Callable[[], nn.Module],
                   rank: int) -> tuple[SimulatedRank, list[Problem]]:
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from moefn.realize import build_device_meshes, realize

    dist.init_process_group("fake", store=FakeStore(), rank=rank,
                            world_size=plan.mesh.world_size)
    try:
        start = time.perf_counter()
        with torch.device("meta"):
            model = build_model()
        realize(plan, model, build_device_meshes(plan.mesh, "cpu"))
        seconds = time.perf_counter() - start
        layouts = param_layouts(plan)
        problems = []
        count = 0
        for name, param in model.named_parameters():
            count += 1
            local = param.to_local() if isinstance(param, DTensor) else param
            want = local_shape(layouts[name], plan.mesh, rank)
            if tuple(local.shape) != want:
                problems.append(Problem(path=name, message=f"rank {rank}: local shape differs",
                                        value=f"realized {list(local.shape)}, planned {list(want)}",
                                        fix="report this: the plan's layout and torch disagree"))
        return SimulatedRank(rank=rank, seconds=seconds, parameters=count), problems
    finally:
        dist.destroy_process_group()


def simulate(plan: ShardPlan, build_model: Callable[[], nn.Module],
             ranks: Iterable[int] | None = None) -> tuple[SimulatedRank, ...]:
    """Realize ``plan`` on a fake process group for ``ranks``; PlanError on any mismatch."""
    if dist.is_initialized():
        raise PlanError.single("", "simulate needs a process without a process group",
                               dist.get_backend(), "run the simulation in its own process")
    results, problems = [], []
    for rank in ranks if ranks is not None else representative_ranks(plan.mesh):
        result, found = _simulate_rank(plan, build_model, rank)
        results.append(result)
        problems += found
    if problems:
        raise PlanError(problems)
    return tuple(results)
