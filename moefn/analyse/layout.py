"""Where each parameter ends up: its placements per mesh axis and per-rank local shapes.

Computed symbolically from the plan — ranks with the same local shape are counted together, so
a 4096-rank layout costs the same as a 4-rank one. Sharding follows ``torch.chunk`` (as DTensor
and FSDP2 do): ``ceil(n / k)`` rows per shard, the last shards short or empty.

>>> chunk_sizes(10, 4)
{3: 3, 1: 1}
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterator, Mapping

from attrs import frozen

from moefn.plan.memo import per_object
from moefn.plan.mesh import Axis, MeshSpec
from moefn.plan.records import DistributeParams, FullyShard, Shard, ShardPlan
from moefn.plan.spec import TensorInfo, enclosing


def chunk_sizes(size: int, parts: int) -> dict[int, int]:
    """Local sizes of a dim of ``size`` split in ``parts`` by torch.chunk → number of shards."""
    if parts == 1:
        return {size: 1}
    step = -(-size // parts)
    counts: Counter[int] = Counter()
    full = size // step if step else 0
    if full:
        counts[step] = min(full, parts)
    rest = size - full * step
    used = counts[step]
    if rest and used < parts:
        counts[rest] += 1
        used += 1
    if used < parts:
        counts[0] += parts - used
    return dict(counts)


@frozen(kw_only=True)
class ParamLayout:
    """Final layout of one parameter: the axes it is sharded over, in application order."""

    name: str
    shape: tuple[int, ...]
    shards: tuple[tuple[Axis, int], ...]  # (mesh axis, tensor dim), EP first, then FSDP
    unit: str | None

    def local_shapes(self, mesh: MeshSpec) -> tuple[tuple[tuple[int, ...], int], ...]:
        """((local shape, number of ranks), ...) over the whole world, largest count first."""
        per_dim: list[dict[int, int]] = [{n: 1} for n in self.shape]
        for axis, dim in self.shards:
            nxt: Counter[int] = Counter()
            for size, count in per_dim[dim].items():
                for local, shards in chunk_sizes(size, mesh.size(axis)).items():
                    nxt[local] += count * shards
            per_dim[dim] = dict(nxt)
        shapes: Counter[tuple[int, ...]] = Counter({(): 1})
        for dim_counts in per_dim:
            grown: Counter[tuple[int, ...]] = Counter()
            for shape, count in shapes.items():
                for size, n in dim_counts.items():
                    grown[(*shape, size)] += count * n
            shapes = grown
        sharded_ranks = math.prod(mesh.size(axis) for axis, _ in self.shards)
        scale = mesh.world_size // sharded_ranks
        return tuple(sorted(((s, c * scale) for s, c in shapes.items()),
                            key=lambda item: (-item[1], item[0])))


def local_shape(layout: ParamLayout, mesh: MeshSpec, rank: int) -> tuple[int, ...]:
    """The shape ``rank`` holds: shards applied in order, each a ``torch.chunk`` slice."""
    return local_shape_and_offset(layout, mesh, rank)[0]


def local_shape_and_offset(layout: ParamLayout, mesh: MeshSpec,
                           rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The shape ``rank`` holds and where it starts in the full parameter.

    >>> local_shape_and_offset(ParamLayout(name="w", shape=(10, 3), shards=(("dp_shard", 0),),
    ...                                    unit=""), MeshSpec(dp_shard=4), 3)
    ((1, 3), (9, 0))
    """
    shape, offset = list(layout.shape), [0] * len(layout.shape)
    for axis, dim in layout.shards:
        parts, index = mesh.size(axis), mesh.coordinate(rank, axis)
        step = -(-shape[dim] // parts)
        start = min(index * step, shape[dim])
        offset[dim] += start
        shape[dim] = max(0, min(step, shape[dim] - start))
    # an empty shard sits at the end of its dim (torch's convention)
    return tuple(shape), tuple(offset[d] if shape[d] else layout.shape[d]
                               for d in range(len(shape)))


def fsdp_shard_ranks(unit: FullyShard, mesh: MeshSpec) -> int:
    """How many ranks one shard group of ``unit`` spans (``dp_replicate`` replicates)."""
    return math.prod(mesh.size(axis) for axis in unit.mesh_dims if axis != "dp_replicate")


def fsdp_shard_numel(layout: ParamLayout, unit: FullyShard, mesh: MeshSpec) -> tuple[int, int]:
    """(padded, mean unpadded) elements of one rank's FSDP2 shard of a parameter.

    FSDP2 stores every rank's shard padded to shard 0's size (``ceil(rows / n)`` rows), so the
    padded size is what each rank allocates and all-gathers.

    >>> unit = FullyShard(stage="fsdp", path="", mesh_dims=("dp_shard",))
    >>> fsdp_shard_numel(ParamLayout(name="w", shape=(10, 3), shards=(), unit=""),
    ...                  unit, MeshSpec(dp_shard=4))
    (9, 7)
    """
    before = ParamLayout(name=layout.name, shape=layout.shape, unit=None,
                         shards=tuple(s for s in layout.shards if s[0] not in unit.mesh_dims))
    shape = local_shape(before, mesh, 0)  # EP shards are even: every rank has this shape
    n = fsdp_shard_ranks(unit, mesh)
    rest = math.prod(size for i, size in enumerate(shape) if i != unit.shard_dim)
    return -(-shape[unit.shard_dim] // n) * rest, shape[unit.shard_dim] * rest // n


def fsdp_gathered(plan: ShardPlan) -> Iterator[tuple[int, TensorInfo, FullyShard, int]]:
    """(index in the model's tensors, tensor, its FSDP unit, elements the unit gathers for it,
    padded) for every parameter an FSDP unit manages, in module order."""
    layouts = param_layouts(plan)
    units = {u.path: u for u in plan.steps_of(FullyShard)}
    for index, info in enumerate(plan.model.tensors):
        layout = layouts.get(info.name)
        if layout is not None and layout.unit is not None:
            unit = units[layout.unit]
            numel = fsdp_shard_numel(layout, unit, plan.mesh)[0] * fsdp_shard_ranks(unit, plan.mesh)
            yield index, info, unit, numel


@per_object
def param_layouts(plan: ShardPlan) -> Mapping[str, ParamLayout]:
    """Full parameter name → its layout (every trainable or frozen parameter, once; computed
    once per plan)."""
    distributed = plan.distributed_params()
    units: dict[str, FullyShard] = {}
    for u in plan.steps_of(FullyShard):
        units.setdefault(u.path, u)
    layouts: dict[str, ParamLayout] = {}
    for info in plan.model.tensors:
        if info.is_buffer:
            continue
        shards: list[tuple[Axis, int]] = []
        step = distributed.get(info.name)
        if isinstance(step, DistributeParams):
            for axis, placement in zip(step.mesh_dims, step.placements, strict=True):
                if isinstance(placement, Shard):
                    shards.append((axis, placement.dim))
        unit = owning_unit(info.name, units)
        if isinstance(unit, FullyShard):
            shards += [(axis, unit.shard_dim) for axis in unit.mesh_dims if axis != "dp_replicate"]
        layouts[info.name] = ParamLayout(name=info.name, shape=info.shape, shards=tuple(shards),
                                         unit=None if unit is None else unit.path)
    return layouts


def owning_unit(name: str, units: Mapping[str, FullyShard]) -> FullyShard | None:
    """The innermost FSDP unit (``units`` by path) whose module contains parameter ``name``
    and does not ignore it."""
    for path in enclosing(name):
        unit = units.get(path)
        if unit is not None and name not in unit.ignored:
            return unit
    return None
