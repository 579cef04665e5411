"""Realize a plan for a few representative ranks of a big world inside one process.

Uses torch's fake process group on a meta-device model (no memory, no communication): each
simulated rank runs the real `realize` (DTensor + fully_shard) and every parameter's local shape
is checked against the plan's symbolic layout. A fake group simulates one rank per process, so
we realize the first rank, the last, and one in the middle of an EP group; from each realized
parameter's mesh and placements, torch's own ``compute_local_shape_and_global_offset`` then
gives the local shape and offset of every rank of that mesh, and each must equal the plan's.

>>> import torch
>>> from moefn import MeshSpec, compose, plan_ep, plan_fsdp
>>> from moefn.adapters.reference import MoETransformer, get_preset
>>> build = lambda: MoETransformer(get_preset("tiny"))
>>> with torch.device("meta"):
...     plan = compose(plan_ep(), plan_fsdp())(build(), MeshSpec(dp_shard=64, ep=8)).unwrap()
>>> [r.rank for r in simulate(plan, build)]  # first, middle of an EP group, last
[0, ..., 63]
"""

from __future__ import annotations

import functools
import itertools
import time
from collections.abc import Callable, Iterable

import torch
import torch.distributed as dist
from attrs import frozen
from torch import nn
from torch.distributed.tensor import DTensor, Placement
from torch.distributed.tensor._utils import _compute_local_shape_and_global_offset

from moefn.analyse.layout import local_shape, local_shape_and_offset, param_layouts
from moefn.launch import fake_world
from moefn.plan.arguments import expect_type, shown
from moefn.plan.errors import ArgumentTypeError, PlanError, Problem
from moefn.plan.mesh import MeshSpec
from moefn.plan.records import ShardPlan


def representative_ranks(mesh: MeshSpec) -> tuple[int, ...]:
    """First rank, last rank, and a rank in the middle of an EP group halfway through."""
    middle = (mesh.world_size // 2) // mesh.ep * mesh.ep + mesh.ep // 2
    return tuple(sorted({0, mesh.world_size - 1, min(middle, mesh.world_size - 1)}))


@frozen(kw_only=True)
class SimulatedRank:
    rank: int
    seconds: float
    parameters: int
    ranks_checked: int  # ranks whose shards torch placed as planned, from this rank's meshes


def _simulate_rank(plan: ShardPlan, build_model: Callable[[], nn.Module],
                   rank: int) -> tuple[SimulatedRank, list[Problem]]:
    from moefn.realize import build_device_meshes, realize

    with fake_world(plan.mesh.world_size, rank):
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
                                        fix=_REPORT))
        checked, wrong = _check_every_rank(plan, model)
        return (SimulatedRank(rank=rank, seconds=seconds, parameters=count,
                              ranks_checked=checked), problems + wrong)


_REPORT = "report this: the plan's layout and torch disagree"


@functools.lru_cache(maxsize=1 << 16)  # simulated ranks share most meshes' shapes and placements
def _torch_places(shape: tuple[int, ...], mesh_shape: tuple[int, ...], coordinate: tuple[int, ...],
                  placements: tuple[Placement, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """torch's local shape and global offset of the shard at ``coordinate`` of a mesh."""
    got = _compute_local_shape_and_global_offset(shape, mesh_shape, list(coordinate), placements)
    return tuple(got[0]), tuple(got[1])


def _check_every_rank(plan: ShardPlan, model: nn.Module) -> tuple[int, list[Problem]]:
    """Every rank of each parameter's mesh: torch's local shape and offset against the plan's.

    Parameters with the same shape, mesh, placements and planned shards share one check.
    Returns how many distinct ranks were checked, and the problems."""
    layouts = param_layouts(plan)
    seen: set[object] = set()
    checked: set[int] = set()
    problems = []
    for name, param in model.named_parameters():
        layout = layouts[name]
        if not isinstance(param, DTensor):
            if layout.shards:
                problems.append(Problem(path=name, message="not sharded, but planned sharded",
                                        value=str(layout.shards), fix=_REPORT))
            continue
        mesh, placements = param.device_mesh, tuple(param.placements)
        key = (tuple(param.shape), id(mesh), placements, layout.shards)
        if key in seen:
            continue
        seen.add(key)
        ranks = mesh.mesh
        coordinates = itertools.product(*(range(n) for n in ranks.shape))
        for coordinate, rank in zip(coordinates, ranks.flatten().tolist(), strict=True):
            checked.add(rank)
            got = _torch_places(tuple(param.shape), tuple(ranks.shape), coordinate, placements)
            want = local_shape_and_offset(layout, plan.mesh, rank)
            if got != want:
                problems.append(Problem(
                    path=name, message=f"rank {rank}: torch places the shard elsewhere",
                    value=f"torch shape {list(got[0])} offset {list(got[1])}, planned shape "
                          f"{list(want[0])} offset {list(want[1])}", fix=_REPORT))
                break
    return len(checked), problems


def simulate(plan: ShardPlan, build_model: Callable[[], nn.Module],
             ranks: Iterable[int] | None = None,
             progress: Callable[[str], None] | None = None) -> tuple[SimulatedRank, ...]:
    """Realize ``plan`` on a fake process group for ``ranks``; PlanError on any mismatch.

    ``progress`` gets a line before and after each rank (a big world takes minutes per rank)."""
    expect_type(plan, ShardPlan, "plan", "a ShardPlan", "pass compose(...)(model, mesh).unwrap()")
    if not callable(build_model) or isinstance(build_model, nn.Module):
        raise ArgumentTypeError.single("build_model", "expected a function that builds the model",
                                       shown(build_model),
                                       "pass lambda: MyModel(config) (each rank builds its own)")
    chosen = representative_ranks(plan.mesh) if ranks is None else tuple(ranks)
    wrong = [r for r in chosen if type(r) is not int or not 0 <= r < plan.mesh.world_size]
    if wrong:
        raise PlanError.single("ranks", "ranks outside the plan's world", shown(wrong),
                               f"use ranks in 0..{plan.mesh.world_size - 1}")
    if dist.is_initialized():
        raise PlanError.single("", "simulate needs a process without a process group",
                               dist.get_backend(), "run the simulation in its own process")
    say = progress or (lambda line: None)
    results, problems = [], []
    for i, rank in enumerate(chosen):
        say(f"simulating rank {rank} ({i + 1}/{len(chosen)}) of {plan.mesh.world_size} on a fake "
            "process group: realize, then check every rank's shards ...")
        result, found = _simulate_rank(plan, build_model, rank)
        say(f"  rank {rank}: realized in {result.seconds:.1f} s, {result.parameters} parameters, "
            f"{result.ranks_checked} ranks' shards checked, {len(found)} problems")
        results.append(result)
        problems += found
    if problems:
        raise PlanError(problems)
    return tuple(results)
