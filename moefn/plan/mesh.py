"""MeshSpec: the pure description of the device mesh and its one fixed rank layout.

Dense parameters see the ranks as ``dp_replicate × dp_shard × cp × tp`` (outer to inner, tp
innermost). Experts see the same ranks with ``dp_shard × cp × tp`` re-split as ``ep_shard × ep``, ep
innermost, so an EP group is a run of adjacent ranks. Named groups: ``dp_shard_cp`` (dp_shard × cp
flattened, the data-parallel group of tensor-parallel parameters), ``dp_shard_cp_tp`` (every rank
of a replica: the data-parallel group of parameters that see tp-distinct tokens) and
``ep_shard`` (ranks holding the same experts).

>>> m = MeshSpec.parse("dp_shard=4,ep=2")
>>> m.world_size, m.ep_shard, m.size("dp_shard_cp")
(4, 2, 4)
>>> t = MeshSpec.parse("dp_shard=2,tp=2,ep=2")
>>> t.world_size, t.ep_shard, t.size("dp_shard_cp"), t.size("dp_shard_cp_tp")
(4, 2, 2, 4)
"""

from __future__ import annotations

import math
from typing import Final, Literal, get_args

from attrs import frozen

from moefn.plan.arguments import expect_type, int_at_least, one_of
from moefn.plan.errors import ArgumentTypeError, PlanError, Problem

Axis = Literal["dp_replicate", "dp_shard", "cp", "tp", "dp_shard_cp", "dp_shard_cp_tp",
               "ep_shard", "ep"]
"""Every axis name a plan may refer to."""
Dim = Literal["dp_replicate", "dp_shard", "cp", "tp", "ep_shard", "ep"]
"""The dimensions of the device mesh's views (flattened axes span several)."""
BaseAxis = Literal["dp_replicate", "dp_shard", "cp", "tp", "ep"]
"""The sizes a MeshSpec is made of."""

BASE_AXES: Final[tuple[BaseAxis, ...]] = get_args(BaseAxis)
DENSE_DIMS: Final[tuple[Dim, ...]] = ("dp_replicate", "dp_shard", "cp", "tp")
EXPERT_DIMS: Final[tuple[Dim, ...]] = ("dp_replicate", "ep_shard", "ep")
#: Every axis, with the dimensions it spans (outer to inner).
AXIS_SPANS: Final[dict[Axis, tuple[Dim, ...]]] = {
    "dp_replicate": ("dp_replicate",),
    "dp_shard": ("dp_shard",),
    "cp": ("cp",),
    "tp": ("tp",),
    "dp_shard_cp": ("dp_shard", "cp"),
    "dp_shard_cp_tp": ("dp_shard", "cp", "tp"),
    "ep_shard": ("ep_shard",),
    "ep": ("ep",),
}


MAX_WORLD: Final = 2**31 - 1
"""c10d numbers ranks with 32-bit integers: no world is larger."""


def divisors(n: int) -> tuple[int, ...]:
    """Every divisor of ``n`` (1 ≤ n ≤ MAX_WORLD), ascending; trial division up to √n.

    >>> divisors(12)
    (1, 2, 3, 4, 6, 12)
    """
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return tuple(sorted({*small, *(n // d for d in small)}))


def nearest(values: tuple[int, ...], target: int, count: int = 8) -> tuple[int, ...]:
    """The ``count`` values closest to ``target`` (ascending): a fix names a few, not thousands.

    >>> nearest(divisors(720720), 100, 4)
    (91, 99, 104, 105)
    """
    return tuple(sorted(sorted(values, key=lambda v: (abs(v - target), v))[:count]))


def _mesh_problems(dp_replicate: int, dp_shard: int, cp: int, tp: int, ep: int) -> list[Problem]:
    sizes = (dp_replicate, dp_shard, cp, tp, ep)
    problems = [
        Problem(path="mesh", message=f"axis {name} must be a positive integer", value=repr(size),
                fix=f"set {name}=1 or larger")
        for name, size in zip(BASE_AXES, sizes, strict=True)
        if type(size) is not int or size < 1
    ]
    if not problems and dp_replicate * dp_shard * cp * tp > MAX_WORLD:
        problems.append(Problem(
            path="mesh", message="mesh larger than any world torch.distributed can address",
            value=f"dp_replicate×dp_shard×cp×tp={dp_replicate * dp_shard * cp * tp}",
            fix=f"keep the world size at or below {MAX_WORLD} ranks"))
    if not problems and (dp_shard * cp * tp) % ep:
        valid = nearest(divisors(dp_shard * cp * tp), ep)
        problems.append(Problem(
            path="mesh", message="ep must divide dp_shard × cp × tp (experts re-split those ranks)",
            value=f"ep={ep}, dp_shard×cp×tp={dp_shard * cp * tp}", fix=f"use ep in {valid}"))
    return problems


@frozen(kw_only=True)
class MeshSpec:
    """Axis sizes of the one fixed layout; construction validates (raises PlanError)."""

    dp_replicate: int = 1
    dp_shard: int = 1
    cp: int = 1
    ep: int = 1
    tp: int = 1

    def __attrs_post_init__(self) -> None:
        sizes = (self.dp_replicate, self.dp_shard, self.cp, self.tp, self.ep)
        problems = _mesh_problems(*sizes)
        if problems:
            wrong_type = any(type(size) is not int for size in sizes)
            raise (ArgumentTypeError if wrong_type else PlanError)(problems)

    @classmethod
    def parse(cls, text: str, world_size: int | None = None) -> MeshSpec:
        """Parse ``"dp_shard=8,ep=4"``; when ``world_size`` is given the sizes must multiply to it."""
        expect_type(text, str, "mesh", "a str", 'pass text such as "dp_shard=8,ep=4"')
        if world_size is not None:
            int_at_least(world_size, "world_size")
        sizes: dict[str, int] = {}
        problems: list[Problem] = []
        for item in filter(None, (part.strip() for part in text.split(","))):
            name, sep, value = item.partition("=")
            name = name.strip()
            if not sep or name not in BASE_AXES or not (value.strip().isascii() and value.strip().isdigit()):
                problems.append(Problem(path="mesh", message="not an axis=size item",
                                        value=repr(item),
                                        fix=f"write axis=size with axis in {BASE_AXES}"))
            elif name in sizes:
                problems.append(Problem(path="mesh", message=f"axis {name} given twice",
                                        value=repr(text), fix="give each axis once"))
            else:
                sizes[name] = int(value)
        if problems:
            raise PlanError(problems)
        spec = cls(**sizes)
        if world_size is not None and spec.world_size != world_size:
            raise PlanError.single(
                "mesh", "mesh does not cover the world", f"{spec.world_size} ranks in the mesh, "
                f"world size {world_size}", "make dp_replicate × dp_shard × cp × tp equal the world size")
        return spec

    @property
    def world_size(self) -> int:
        return self.dp_replicate * self.dp_shard * self.cp * self.tp

    @property
    def ep_shard(self) -> int:
        return self.dp_shard * self.cp * self.tp // self.ep

    def base_size(self, dim: Dim) -> int:
        sizes = {"dp_replicate": self.dp_replicate, "dp_shard": self.dp_shard, "cp": self.cp,
                 "tp": self.tp, "ep": self.ep, "ep_shard": self.ep_shard}
        return sizes[dim]

    def size(self, axis: Axis) -> int:
        """Size of a named axis (base or flattened); raises PlanError for an unknown name."""
        if not isinstance(axis, str) or axis not in AXIS_SPANS:
            raise PlanError.single("mesh", "unknown mesh axis", repr(axis),
                                   f"use one of {tuple(AXIS_SPANS)}")
        return math.prod(self.base_size(dim) for dim in AXIS_SPANS[axis])

    def _check_rank(self, rank: int) -> None:
        if int_at_least(rank, "rank", 0) >= self.world_size:
            raise PlanError.single("rank", "rank outside the mesh's world", rank,
                                   f"use a rank in 0..{self.world_size - 1}")

    def coordinate(self, rank: int, axis: Axis) -> int:
        """This rank's index along ``axis`` (row-major, outer to inner, as the DeviceMesh lays it)."""
        self._check_rank(rank)
        one_of(axis, tuple(AXIS_SPANS), "axis")
        dims = EXPERT_DIMS if axis in ("ep", "ep_shard") else DENSE_DIMS
        coords: dict[str, int] = {}
        rest = rank
        for dim in reversed(dims):
            coords[dim] = rest % self.base_size(dim)
            rest //= self.base_size(dim)
        index = 0
        for dim in AXIS_SPANS[axis]:
            index = index * self.base_size(dim) + coords[dim]
        return index

    def group_ranks(self, rank: int, axes: tuple[Axis, ...]) -> tuple[int, ...]:
        """The global ranks of ``rank``'s group over ``axes`` (e.g. its EP group), ascending.

        >>> MeshSpec(dp_shard=4, ep=2).group_ranks(3, ("ep_shard",))
        (1, 3)
        """
        self._check_rank(rank)
        expect_type(axes, tuple, "axes", "a tuple of axis names", 'pass axes=("ep",)')
        for axis in axes:
            one_of(axis, tuple(AXIS_SPANS), "axes")
        spanned = {dim for axis in axes for dim in AXIS_SPANS[axis]}
        view = EXPERT_DIMS if spanned & {"ep", "ep_shard"} else DENSE_DIMS
        fixed = [dim for dim in view if dim not in spanned]
        mine = [self.coordinate(rank, dim) for dim in fixed]
        return tuple(r for r in range(self.world_size)
                     if [self.coordinate(r, dim) for dim in fixed] == mine)

    def describe(self) -> str:
        tp = f"tp={self.tp} " if self.tp > 1 else ""
        text = (f"dp_replicate={self.dp_replicate} dp_shard={self.dp_shard} cp={self.cp} {tp}"
                f"ep={self.ep}")
        return f"{text} (world {self.world_size}, ep_shard={self.ep_shard})"

    def as_text(self) -> str:
        """Round-trips through `parse` (``tp`` only when it is larger than 1)."""
        return ",".join(f"{d}={self.base_size(d)}" for d in BASE_AXES if d != "tp" or self.tp > 1)
