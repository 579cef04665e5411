"""Predict per-rank memory and per-step communication from a plan (pure; no GPU, no ranks).

Memory is exact per rank: each parameter's local shape on that rank follows the plan's shards
(``torch.chunk`` semantics, as DTensor and FSDP2 use). Communication is the logical payload of
each collective a rank receives per training step, for a stated tokens-per-rank and top-k.

>>> est = estimate(plan, rank=0, tokens_per_rank=4096, optimizer="adamw")   # doctest: +SKIP
>>> est.memory.total                                                       # doctest: +SKIP
"""

from __future__ import annotations

from collections import Counter
from typing import Literal

from attrs import frozen

from moefn.layout import ParamLayout, param_layouts
from moefn.mesh import MeshSpec
from moefn.plan import ContextParallelAttention, FullyShard, InstallDispatch, ShardPlan

Optimizer = Literal["adamw", "sgd", "sgd_momentum"]
_STATE_COPIES: dict[str, int] = {"adamw": 2, "sgd": 0, "sgd_momentum": 1}
_BYTES: dict[str, int] = {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8, "int64": 8}


def local_shape(layout: ParamLayout, mesh: MeshSpec, rank: int) -> tuple[int, ...]:
    """The shape ``rank`` holds: shards applied in order, each a ``torch.chunk`` slice."""
    shape = list(layout.shape)
    for axis, dim in layout.shards:
        parts, index = mesh.size(axis), mesh.coordinate(rank, axis)
        step = -(-shape[dim] // parts)
        shape[dim] = max(0, min(step, shape[dim] - index * step))
    return tuple(shape)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


@frozen(kw_only=True)
class Memory:
    """Bytes one rank holds, by kind (``dense``, ``experts``, ``embeddings``)."""

    params: tuple[tuple[str, int], ...]
    grads: tuple[tuple[str, int], ...]
    optimizer: tuple[tuple[str, int], ...]
    gathered_peak: int  # largest unsharded unit (with its nested units) during a forward

    @property
    def total(self) -> int:
        return sum(v for part in (self.params, self.grads, self.optimizer) for _, v in part)


@frozen(kw_only=True)
class Comm:
    """Bytes a rank receives per step, per collective, and the lower bound of each."""

    collective: str
    bytes: int
    lower_bound: int


@frozen(kw_only=True)
class Estimate:
    rank: int
    memory: Memory
    comm: tuple[Comm, ...]


def _kind(name: str, plan: ShardPlan) -> str:
    spec = plan.model
    if any(name.startswith(p + ".") for p in spec.paths_with("experts")):
        return "experts"
    if any(name.startswith(p + ".") for p in (*spec.paths_with("embed"),
                                              *spec.paths_with("lm_head"))):
        return "embeddings"
    return "dense"


def estimate_memory(plan: ShardPlan, rank: int, optimizer: Optimizer = "adamw") -> Memory:
    """Exact parameter/gradient bytes of ``rank`` and optimizer state (same dtype as params)."""
    params: Counter[str] = Counter()
    grads: Counter[str] = Counter()
    states: Counter[str] = Counter()
    trainable = {t.name for t in plan.model.tensors if t.requires_grad}
    dtypes = {t.name: t.dtype for t in plan.model.tensors}
    for name, layout in param_layouts(plan).items():
        size = _numel(local_shape(layout, plan.mesh, rank)) * _BYTES.get(dtypes[name], 4)
        kind = _kind(name, plan)
        params[kind] += size
        if name in trainable:
            grads[kind] += size
            states[kind] += size * _STATE_COPIES[optimizer]
    return Memory(params=tuple(sorted(params.items())), grads=tuple(sorted(grads.items())),
                  optimizer=tuple(sorted(states.items())), gathered_peak=_gathered_peak(plan))


def _unit_of(plan: ShardPlan) -> dict[str, FullyShard | None]:
    layouts = param_layouts(plan)
    units = {u.path: u for u in plan.steps_of(FullyShard)}
    return {name: units.get(layout.unit or "\0") for name, layout in layouts.items()}


def _gathered_peak(plan: ShardPlan) -> int:
    """Bytes of the largest non-root unit when unsharded, counting the units nested in it."""
    layouts = param_layouts(plan)
    dtypes = {t.name: t.dtype for t in plan.model.tensors}
    owner = _unit_of(plan)
    peak = 0
    for unit in plan.steps_of(FullyShard):
        if unit.path == "":
            continue
        total = 0
        for name, layout in layouts.items():
            own = owner[name]
            if own is None or not (own.path == unit.path or own.path.startswith(unit.path + ".")):
                continue
            unsharded = ParamLayout(name=name, shape=layout.shape, unit=None,
                                    shards=tuple(s for s in layout.shards
                                                 if s[0] not in own.mesh_dims))
            dtype = own.param_dtype or dtypes[name]
            total += _numel(local_shape(unsharded, plan.mesh, 0)) * _BYTES.get(dtype, 4)
        peak = max(peak, total)
    return peak


def _fsdp_comm(plan: ShardPlan) -> list[Comm]:
    layouts = param_layouts(plan)
    dtypes = {t.name: t.dtype for t in plan.model.tensors}
    owner = _unit_of(plan)
    gather, scatter, gather_bound = 0, 0, 0
    for name, layout in layouts.items():
        unit = owner[name]
        if unit is None:
            continue
        n = 1
        for axis in unit.mesh_dims:
            n *= plan.mesh.size(axis) if axis != "dp_replicate" else 1
        before = ParamLayout(name=name, shape=layout.shape, unit=None,
                             shards=tuple(s for s in layout.shards if s[0] not in unit.mesh_dims))
        shape = list(local_shape(before, plan.mesh, 0))
        rows = -(-shape[unit.shard_dim] // n) * n  # FSDP pads to a multiple of the shards
        padded = _numel(tuple(shape)) // max(shape[unit.shard_dim], 1) * rows
        received = padded * (n - 1) // n
        exact = _numel(tuple(shape)) * (n - 1) // n
        passes = 2 if unit.reshard_after_forward else 1  # regathered for backward
        gather += received * _BYTES.get(unit.param_dtype or dtypes[name], 4) * passes
        gather_bound += exact * _BYTES.get(unit.param_dtype or dtypes[name], 4)
        scatter += received * _BYTES.get(unit.reduce_dtype or dtypes[name], 4)
    return [Comm(collective="fsdp all-gather", bytes=gather, lower_bound=gather_bound),
            Comm(collective="fsdp reduce-scatter", bytes=scatter, lower_bound=scatter)]


def _ep_comm(plan: ShardPlan, tokens: int, top_k: int, hidden: int, act_bytes: int) -> list[Comm]:
    steps = plan.steps_of(InstallDispatch)
    if not steps:
        return []
    ep = plan.mesh.ep
    remote = (ep - 1) / ep
    per_layer_a2a = int(2 * tokens * top_k * hidden * act_bytes * remote)  # dispatch + combine
    per_layer_ag = int(ep * tokens * (hidden + top_k) * act_bytes * remote
                       + tokens * hidden * act_bytes * (ep - 1))
    layers = len(steps)
    bytes_ = layers * 2 * (per_layer_a2a if steps[0].kind == "all_to_all" else per_layer_ag)
    return [Comm(collective=f"ep {steps[0].kind} (forward + backward)", bytes=bytes_,
                 lower_bound=layers * 2 * per_layer_a2a)]


def _cp_comm(plan: ShardPlan, tokens: int, act_bytes: int) -> list[Comm]:
    steps = plan.steps_of(ContextParallelAttention)
    if not steps:
        return []
    cp = plan.mesh.cp
    facts = plan.model.module(steps[0].path.rpartition(".")[0])
    kv = 2 * tokens * cp * int(facts.fact("n_kv_heads")) * int(facts.fact("head_dim"))
    per_layer = int(kv * act_bytes * (cp - 1) / cp)
    recompute = 1 if any(s.path and steps[0].path.startswith(s.path + ".")
                         for s in plan.steps if type(s).__name__ == "Checkpoint") else 0
    return [Comm(collective="cp K/V all-gather + grad reduce-scatter",
                 bytes=len(steps) * per_layer * (2 + recompute),
                 lower_bound=len(steps) * per_layer * 2)]


def estimate(plan: ShardPlan, rank: int = 0, tokens_per_rank: int = 4096, top_k: int = 8,
             hidden: int | None = None, optimizer: Optimizer = "adamw",
             activation_bytes: int = 2) -> Estimate:
    """Memory of ``rank`` and per-step communication for ``tokens_per_rank`` tokens."""
    embed = [t for t in plan.model.tensors if t.module_path in plan.model.paths_with("embed")]
    width = hidden if hidden is not None else (embed[0].shape[-1] if embed else 0)
    comm = (_fsdp_comm(plan) + _ep_comm(plan, tokens_per_rank, top_k, width, activation_bytes)
            + _cp_comm(plan, tokens_per_rank, activation_bytes))
    return Estimate(rank=rank, memory=estimate_memory(plan, rank, optimizer), comm=tuple(comm))
