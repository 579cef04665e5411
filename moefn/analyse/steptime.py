"""Step time of one layout from its FLOPs and its collectives, on a hardware profile (pure).

``step = max(compute, overlappable comm) + exposed comm`` when compute and communication
overlap fully, where

- **compute** is the rank's matmul FLOPs (dense, attention scores, the active experts; forward,
  backward = 2× forward, and the forward again under AC ``full``/``router``; ``selective`` saves
  the matmuls and attention) at the profile's matmul throughput for the compute dtype, plus
  every aten op the step dispatches (`Work.ops`, counted by `moefn.opcount`) at
  ``op_overhead_s`` each, the bytes those that are not matmuls read and write (recompute's
  included) at ``op_bytes_per_s``, and per op the checkpointed blocks dispatch forward what
  their AC adds (its recompute's ops included): ``checkpoint_op_s`` under ``full``/``router``,
  ``selective_op_s`` under ``selective``. Expert FLOPs follow the most loaded rank: ``× imbalance``. All are
  what one rank gets while every rank of its node computes too: a GPU's own on GPUs; on CPU
  ranks sharing cores, a share (`moefn.calibrate` measures them with all ranks busy at once).
- **communication**: every collective (`moefn.analyse.comm.Comm`) on the group the MeshSpec lays
  out (`placement`): calls × latency plus bytes over bandwidth, per the link it crosses. Bytes to
  peers on the rank's node use the intra-node link, the rest the inter-node link; a ring
  collective (all-gather, reduce-scatter, all-reduce, send/recv) whose group spans nodes runs
  at the inter-node speed throughout; an all-to-all moves both shares at once. EP all-to-all
  time follows the most loaded rank: ``× imbalance``.
- **micro-batches**: ``m`` per step; everything runs ``m`` times except the gradient
  reductions (FSDP reduce-scatter, HSDP all-reduce, gradient all-reduce), once per step.
- **overlap** (`Overlap`, switchable): by default FSDP all-gathers (prefetch) and gradient
  reductions may overlap compute; EP dispatch and CP K/V exchange do not (the next op needs
  them). How much of the shorter of the two the hardware hides is the profile's ``overlap``
  (1: all, GPUs' assumption; 0: none; `moefn.calibrate` measures it):
  ``step = compute + overlappable − overlap · min(compute, overlappable) + exposed``.

>>> p = HardwareProfile.from_json(load_profile_json("h100-sxm"))
>>> p.name, p.calibrated
('H100 SXM', False)
"""

from __future__ import annotations

import bisect
import functools
import itertools
import json
import math
from collections.abc import Iterable, Mapping
from importlib import resources
from pathlib import Path
from typing import Any

from attrs import frozen

from moefn.analyse.comm import Comm, Hop
from moefn.plan.errors import PlanError
from moefn.plan.mesh import AXIS_SPANS, DENSE_DIMS, EXPERT_DIMS, Axis, MeshSpec

OPS = ("all_gather", "reduce_scatter", "all_reduce", "all_to_all", "send", "recv")
RING_OPS = ("all_gather", "reduce_scatter", "all_reduce", "send", "recv")
ONCE_PER_STEP = ("fsdp reduce-scatter", "fsdp all-reduce over replicas", "gradient all-reduce")
SHIPPED = ("h100-sxm", "h200", "b200", "mi300x")


@frozen(kw_only=True)
class Link:
    """One collective on one kind of link: seconds per call and bytes per second (per rank)."""

    latency_s: float
    bandwidth_bytes_per_s: float

    def seconds(self, calls: int, moved: float) -> float:
        return calls * self.latency_s + moved / self.bandwidth_bytes_per_s


@frozen(kw_only=True)
class HardwareProfile:
    """Matmul throughput per dtype, per-op costs, how much communication compute hides, and
    per collective its intra- and inter-node `Link` (format ``moefn.hardware`` version 2)."""

    name: str
    calibrated: bool
    source: str
    matmul_flops_per_s: Mapping[str, float]
    op_overhead_s: float  # per dispatched op
    op_bytes_per_s: float  # bytes a non-matmul op reads and writes
    checkpoint_op_s: float  # per forward op of a block AC full/router checkpoints
    selective_op_s: float  # per forward op of a block AC selective checkpoints
    overlap: float  # of the shorter of compute and overlappable communication, hidden
    intra_node: Mapping[str, Link]
    inter_node: Mapping[str, Link]

    @classmethod
    def from_json(cls, data: Mapping[str, Any], where: str = "profile") -> HardwareProfile:
        """Parse a profile; PlanError naming the file and the missing or bad field."""
        try:
            if data.get("format") != "moefn.hardware":
                raise ValueError("format is not 'moefn.hardware'")
            links = {kind: {op: Link(latency_s=float(data[kind][op]["latency_s"]),
                                     bandwidth_bytes_per_s=float(
                                         data[kind][op]["bandwidth_bytes_per_s"]))
                            for op in OPS} for kind in ("intra_node", "inter_node")}
            flops = {str(k): float(v) for k, v in data["matmul_flops_per_s"].items()}
            costs = {k: float(data[k]) for k in ("op_overhead_s", "op_bytes_per_s",
                                                 "checkpoint_op_s", "selective_op_s",
                                                 "overlap")}
            if any(v <= 0 for v in flops.values()) or costs["op_bytes_per_s"] <= 0 or any(
                    link.bandwidth_bytes_per_s <= 0 or link.latency_s < 0
                    for kind in links.values() for link in kind.values()):
                raise ValueError("throughputs and bandwidths must be positive")
            if not 0 <= costs["overlap"] <= 1:
                raise ValueError(f"overlap {costs['overlap']} is not between 0 and 1")
            return cls(name=str(data["name"]), calibrated=bool(data["calibrated"]),
                       source=str(data.get("source", "")), matmul_flops_per_s=flops, **costs,
                       intra_node=links["intra_node"], inter_node=links["inter_node"])
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise PlanError.single("--hardware", "not a moefn hardware profile", where,
                                   f"fix {err} (see moefn/hardware/h100-sxm.json, or write one "
                                   "with `moefn calibrate`)") from err

    def flops(self, dtype: str) -> float:
        if dtype not in self.matmul_flops_per_s:
            raise PlanError.single("--hardware", "profile has no matmul throughput for the "
                                   "compute dtype", f"{self.name}: {dtype}",
                                   f"add matmul_flops_per_s.{dtype} to the profile")
        return self.matmul_flops_per_s[dtype]


def load_profile_json(name_or_path: str) -> dict[str, Any]:
    """A shipped profile by name (`SHIPPED`) or a JSON file's contents."""
    if name_or_path in SHIPPED:
        text = resources.files("moefn").joinpath(f"hardware/{name_or_path}.json").read_text()
    else:
        try:
            text = Path(name_or_path).read_text()
        except OSError as err:
            raise PlanError.single("--hardware", "no such profile", name_or_path,
                                   f"use one of {SHIPPED} or a JSON file ({err.strerror})") from err
    try:
        data: dict[str, Any] = json.loads(text)
    except json.JSONDecodeError as err:
        raise PlanError.single("--hardware", "profile is not JSON", name_or_path,
                               f"fix line {err.lineno}: {err.msg}") from err
    return data


def load_profile(name_or_path: str) -> HardwareProfile:
    return HardwareProfile.from_json(load_profile_json(name_or_path), name_or_path)


@frozen(kw_only=True)
class Overlap:
    """Which communication hides behind compute (the rest is exposed)."""

    fsdp_gather: bool = True  # FSDP2 prefetches the next unit while this one computes
    grad_reduce: bool = True  # reduce-scatter / all-reduce run behind the backward
    ep: bool = False  # the experts wait for their tokens
    cp: bool = False  # attention waits for K/V


@functools.lru_cache(maxsize=4096)
def _members(sizes: tuple[int, int, int, int], axes: tuple[Axis, ...], hop: Hop | None,
             ranks_per_node: int | None) -> tuple[int, ...]:
    mesh = MeshSpec(dp_replicate=sizes[0], dp_shard=sizes[1], cp=sizes[2], ep=sizes[3])
    spanned = {d for a in axes for d in AXIS_SPANS[a]}
    view = EXPERT_DIMS if spanned & {"ep", "ep_shard"} else DENSE_DIMS
    strides = [math.prod(mesh.base_size(d) for d in view[i + 1:]) for i in range(len(view))]
    ranges = [range(0, mesh.base_size(d) * s, s) if d in spanned else range(0, 1)
              for d, s in zip(view, strides, strict=True)]
    members = sorted(sum(r) for r in itertools.product(*ranges))
    if hop == "across nodes" and ranks_per_node:
        return tuple(members[::ranks_per_node])
    if hop == "within node" and ranks_per_node:
        return tuple(members[:ranks_per_node])
    return tuple(members)


@functools.lru_cache(maxsize=65536)
def placement(mesh: MeshSpec, axes: tuple[Axis, ...], gpus_per_node: int, hop: Hop | None = None,
              ranks_per_node: int | None = None) -> tuple[int, int]:
    """(group size, members on rank 0's node, itself included) of rank 0's group over
    ``axes`` (a hierarchical ``hop``: its part of the ep group), nodes being runs of
    ``gpus_per_node`` consecutive ranks. Rank 0 stands for all: the layout is regular.

    >>> mesh = MeshSpec(dp_shard=16, ep=8)
    >>> placement(mesh, ("ep",), 8), placement(mesh, ("ep_shard",), 8)
    ((8, 8), (2, 1))
    """
    members = _members((mesh.dp_replicate, mesh.dp_shard, mesh.cp, mesh.ep), axes, hop,
                       ranks_per_node)
    return len(members), bisect.bisect_left(members, gpus_per_node)  # members are sorted


@frozen(kw_only=True)
class Traffic:
    """One collective per step, placed: bytes (each way, the larger) on each link, seconds."""

    collective: str
    family: str  # "fsdp", "grad", "ep", "cp"
    calls: int
    intra_bytes: int
    inter_bytes: int
    seconds: float


def family(comm: Comm) -> str:
    if comm.collective in ONCE_PER_STEP:
        return "grad"
    return comm.collective.split(" ")[0]  # "fsdp", "ep", "cp"


def place(comm: Comm, mesh: MeshSpec, gpus_per_node: int, profile: HardwareProfile,
          micro_batches: int, imbalance: float, ranks_per_node: int | None = None) -> Traffic:
    """``comm`` (one micro-batch's) over a step: repeated per micro-batch unless a gradient
    reduction, on the links its group crosses."""
    kind = family(comm)
    times = 1 if kind == "grad" else micro_batches
    n, local = placement(mesh, comm.axes, gpus_per_node, comm.hop, ranks_per_node)
    moved = max(comm.sent, comm.received) * times
    calls = comm.calls * times
    if n <= 1:
        return Traffic(collective=comm.collective, family=kind, calls=calls, intra_bytes=moved,
                       inter_bytes=0, seconds=0.0)
    inter = moved * (n - local) // (n - 1)
    intra = moved - inter
    scale = imbalance if kind == "ep" and comm.op == "all_to_all" else 1.0
    if not inter:
        seconds = profile.intra_node[comm.op].seconds(calls, intra * scale)
    elif comm.op in RING_OPS:
        seconds = profile.inter_node[comm.op].seconds(calls, moved * scale)
    else:
        seconds = max(profile.inter_node[comm.op].seconds(calls, inter * scale),
                      profile.intra_node[comm.op].seconds(calls, intra * scale))
    return Traffic(collective=comm.collective, family=kind, calls=calls, intra_bytes=intra,
                   inter_bytes=inter, seconds=seconds)


@frozen(kw_only=True)
class Work:
    """A rank's compute per step: matmul FLOPs (dense and experts apart), aten ops dispatched
    (recompute's aside), bytes the non-matmul ones move, and the forward ops of checkpointed
    blocks under each AC mode."""

    dense_flops: float
    expert_flops: float
    dtype: str
    ops: int = 0
    op_bytes: float = 0.0
    checkpointed_ops: int = 0  # under AC full or router
    selective_ops: int = 0  # under AC selective


@frozen(kw_only=True)
class StepTime:
    """Seconds per step and their parts; bytes per step on each link."""

    seconds: float
    compute_s: float
    exposed_s: dict[str, float]  # per family, not hidden behind compute
    overlapped_s: float
    bytes_intra_node: int
    bytes_inter_node: int


def step_time(work: Work, traffic: Iterable[Traffic], profile: HardwareProfile,
              imbalance: float = 1.0, overlap: Overlap = Overlap()) -> StepTime:
    """``compute + overlappable − overlap · min(compute, overlappable) + exposed`` (module
    docstring).

    >>> prof = HardwareProfile.from_json(load_profile_json("h100-sxm"))
    >>> w = Work(dense_flops=989.5e12, expert_flops=0.0, dtype="bfloat16")
    >>> t = Traffic(collective="ep dispatch + combine", family="ep", calls=0, intra_bytes=450 * 10**9,
    ...             inter_bytes=0, seconds=1.0)
    >>> step_time(w, [t], prof).seconds
    2.0
    """
    compute = ((work.dense_flops + imbalance * work.expert_flops) / profile.flops(work.dtype)
               + work.ops * profile.op_overhead_s + work.op_bytes / profile.op_bytes_per_s
               + work.checkpointed_ops * profile.checkpoint_op_s
               + work.selective_ops * profile.selective_op_s)
    hidden = {"fsdp": overlap.fsdp_gather, "grad": overlap.grad_reduce, "ep": overlap.ep,
              "cp": overlap.cp}
    exposed: dict[str, float] = {}
    overlapped = 0.0
    intra = inter = 0
    for t in traffic:
        intra += t.intra_bytes
        inter += t.inter_bytes
        if hidden.get(t.family, False):
            overlapped += t.seconds
        else:
            exposed[t.family] = exposed.get(t.family, 0.0) + t.seconds
    hidden_s = profile.overlap * min(compute, overlapped)
    return StepTime(seconds=compute + overlapped - hidden_s + sum(exposed.values()),
                    compute_s=compute,
                    exposed_s=exposed, overlapped_s=overlapped, bytes_intra_node=intra,
                    bytes_inter_node=inter)
