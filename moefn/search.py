"""Which layout? Enumerate, prune, rank by step time, then re-plan the best (pure: meta model).

`search` enumerates every layout of a world — ``dp_replicate × dp_shard × cp`` meshes, ``ep``,
the dispatch, the AC mode, FSDP's reshard-after-forward and the rows per micro-batch (the
micro-batches per step, ``T / (seq_len × rows × dp_replicate × dp_shard)``, a whole number) —,
drops those the stages refuse (each stage run on its own, once per distinct option), scores the
rest with a closed form (`ClosedForm`: sharded state, activations scaled from one real
`activation_memory` per AC mode, and every collective from `moefn.analyse.comm`'s builders) on
a `moefn.analyse.steptime.HardwareProfile`, keeps those that fit, and ranks them by step time.
The best are then planned for real (`compose`, `estimate` on the first and last rank,
`predict_comm`) until ``top`` fit, and each reports its difference from the closed form.
"""

from __future__ import annotations

import functools
import itertools
import math
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Literal

from attrs import evolve, frozen
from returns.result import Failure
from torch import nn

from moefn.analyse.activations import activation_phases, buffers_of, hidden_dtype, unit_sizes
from moefn.analyse.comm import (
    Comm,
    a2a_dispatch_comm,
    ag_dispatch_comm,
    cp_attention_comm,
    cp_check_comm,
    fsdp_unit_comm,
    merge_comms,
)
from moefn.analyse.dispatch_rows import expected_rows
from moefn.analyse.estimate import STATE_COPIES, buffer_bytes, estimate
from moefn.analyse.flops import ModelFlops, model_flops
from moefn.analyse.layout import ParamLayout, fsdp_shard_numel, local_shape, param_layouts
from moefn.analyse.steptime import (
    HardwareProfile,
    Overlap,
    StepTime,
    Traffic,
    Work,
    place,
    step_time,
)
from moefn.opcount import OpCounts, count_ops
from moefn.plan.compose import Stage, compose, plan_or_raise
from moefn.plan.dtypes import DTYPE_BYTES
from moefn.plan.mesh import Axis, MeshSpec, divisors
from moefn.plan.records import FullyShard, ShardPlan
from moefn.plan.spec import ModelSpec, inspect_model
from moefn.plan.stages import plan_ac, plan_cp, plan_ep, plan_fsdp

AcMode = Literal["none", "selective", "router", "full"]
AC_MODES: tuple[AcMode, ...] = ("none", "selective", "router", "full")
NOT_SEARCHED = ("pipeline parallelism", "CPU offload", "precision (bf16 params, fp32 reduce)",
                "CP over the p2p ring (all-gather K/V only)", "AC of some blocks only",
                "optimizers other than AdamW")


@frozen(kw_only=True)
class Request:
    """What to search: a world of ``world`` ranks, ``gpus_per_node`` to a node, a device of
    ``gpu_memory`` bytes less ``reserve``, ``global_batch_tokens`` per step of ``seq_len``."""

    world: int
    gpus_per_node: int
    gpu_memory: int
    reserve: int
    seq_len: int
    global_batch_tokens: int
    profile: HardwareProfile
    imbalance: float = 1.0
    top: int = 3
    overlap: Overlap = Overlap()
    precision: Literal["bf16", "fp32"] = "bf16"  # plan_fsdp's


@frozen(kw_only=True)
class Layout:
    mesh: MeshSpec
    dispatch: str  # "none" when ep = 1
    ac: AcMode
    reshard: bool
    rows: int
    micro_batches: int

    ranks_per_node: int | None = None  # hierarchical dispatch only

    def argv(self, seq_len: int) -> list[str]:
        """The `moefn plan` flags (after the model) that plan this layout."""
        out = ["--mesh", self.mesh.as_text(), "--seq-len", str(seq_len), "--rows", str(self.rows),
               "--ac", self.ac]
        if self.dispatch != "none":
            out += ["--dispatch", self.dispatch]
            if self.dispatch == "hierarchical":
                out += ["--ranks-per-node", str(self.ranks_per_node)]
        if not self.reshard:
            out.append("--no-reshard-after-forward")
        return out


@frozen(kw_only=True)
class Scored:
    """A layout with its peak (bytes, worst rank), its step time and the largest part of it."""

    layout: Layout
    peak: int
    parts: dict[str, int]
    step: StepTime
    tokens_per_s_per_gpu: float


@frozen(kw_only=True)
class Checked:
    """A re-planned layout: the real plan's numbers, and how far the closed form was."""

    exact: Scored
    closed: Scored

    def difference(self) -> dict[str, float]:
        a, b = self.exact, self.closed
        return {"peak_bytes": a.peak - b.peak, "step_time_s": a.step.seconds - b.step.seconds,
                "bytes_intra_node": a.step.bytes_intra_node - b.step.bytes_intra_node,
                "bytes_inter_node": a.step.bytes_inter_node - b.step.bytes_inter_node}


@frozen(kw_only=True)
class Result:
    layouts: tuple[Checked, ...]
    rejected: dict[str, int]
    closest: tuple[Scored, ...]  # when nothing fits: the lowest peaks
    searched: int
    not_searched: tuple[str, ...] = NOT_SEARCHED


@frozen(kw_only=True)
class ModelSummary:
    """What the closed form needs of the model, taken once (`summarise`) from its snapshot and
    proxy plans."""

    spec: ModelSpec
    flops: ModelFlops
    ops: OpCounts
    hidden: int
    act_bytes: int
    moe_layers: int
    num_experts: int
    top_k: int
    groups: tuple[int, int]
    shared_experts: bool
    # attentions alike: (K+V width per token, causal) → how many, in model order
    attention: dict[tuple[int, bool], int]
    kv_widths: tuple[int, int]  # K+V width per token: of every attention, of the first
    # shape, dtype, requires grad, kind (`_kinds`), gathered dtype, reduced dtype, how many
    tensors: tuple[tuple[tuple[int, ...], str, bool, str, str, str, int], ...]
    units: dict[str, int]  # kind (`_kinds`) → FSDP units
    param_dtype: str  # the blocks' compute dtype
    buffers: int
    # AC mode → tokens, and per phase kind (`FSDP_AT_PHASE`) the largest bytes on top of
    # the sharded state but FSDP's buffers, with which of FSDP's buffers that phase holds
    activations: dict[str, tuple[int, tuple[tuple[int, int], ...]]]
    # per FSDP unit, in forward order: path, gathered and reduced bytes each as (a, b) of
    # a + b / ep, resharded after forward
    fsdp: tuple[tuple[str, tuple[float, float], tuple[float, float], bool], ...]


_FSDP_AT_PHASE = {"logits": 0, "forward": 1, "backward": 2}  # in `fsdp_buffers`' order


def _kinds(plan: ShardPlan) -> dict[str, tuple[str, str, str]]:
    """Parameter → (kind, gathered dtype, reduced dtype); kind is "experts", "outer" (its unit
    stays gathered after forward), "outer experts" (the last block's), "dense" or
    "unsharded"."""
    units = {u.path: u for u in plan.steps_of(FullyShard)}
    experts = plan.model.paths_with("experts")
    out = {}
    for name, layout in param_layouts(plan).items():
        dtype = plan.model.tensor(name).dtype
        unit = units.get(layout.unit) if layout.unit is not None else None
        gathered = (unit.param_dtype if unit else None) or dtype
        reduced = (unit.reduce_dtype if unit else None) or gathered
        if any(name.startswith(p + ".") for p in experts):
            kind = "experts" if unit is None or unit.reshard_after_forward else "outer experts"
        elif unit is None:
            kind = "unsharded"
        else:
            kind = "dense" if unit.reshard_after_forward else "outer"
        out[name] = (kind, gathered, reduced)
    return out


def _proxy_stages(ac: AcMode, experts: bool, precision: Literal["bf16", "fp32"]) -> list[Stage]:
    stages: list[Stage] = [plan_ep()] if experts else []
    if ac != "none":
        stages.append(plan_ac(mode=ac))
    return [*stages, plan_fsdp(precision=precision)]


def summarise(model: nn.Module, request: Request, modes: tuple[AcMode, ...]) -> ModelSummary:
    """The model's `ModelSummary` for ``request``, with activations for the AC ``modes``."""
    spec = inspect_model(model)
    experts = spec.paths_with("experts")
    # ep_shard = 2: expert parameters in units of their own, as in most searched layouts
    proxy_mesh = MeshSpec(dp_shard=4, ep=2) if experts else MeshSpec(dp_shard=4)
    proxies = {ac: plan_or_raise(compose(*_proxy_stages(ac, bool(experts), request.precision))(
        model, proxy_mesh)) for ac in modes}
    plan = proxies[modes[0]]
    kinds = _kinds(plan)
    grouped: Counter[tuple[tuple[int, ...], str, bool, str, str, str]] = Counter(
        (t.shape, t.dtype, t.requires_grad, *kinds[t.name]) for t in spec.tensors
        if t.name in kinds)
    units = plan.steps_of(FullyShard)
    dtype = hidden_dtype(plan)
    activations: dict[str, tuple[int, tuple[tuple[int, int], ...]]] = {}
    for ac, proxy in proxies.items():
        largest: dict[int, int] = {}
        for name, parts in activation_phases(proxy, 1, request.seq_len, request.imbalance, 0,
                                             dtype):
            which = _FSDP_AT_PHASE.get(name.split(" ")[0])
            if which is not None:  # the optimizer's phase: `ClosedForm.peak`'s temporaries
                rest = sum(parts.values()) - parts.get("fsdp_buffers", 0)
                largest[which] = max(largest.get(which, 0), rest)
        activations[ac] = (request.seq_len, tuple((v, k) for k, v in largest.items()))
    # each unit's buffers hold its local experts unsharded: measured at ep = 2 and ep = 4
    units_2 = unit_sizes(plan)
    units_4 = (unit_sizes(plan_or_raise(compose(*_proxy_stages("none", True, request.precision))(
        model, MeshSpec(dp_shard=8, ep=4)))) if experts else units_2)
    fsdp = tuple((path, (2.0 * g4 - g2, 4.0 * (g2 - g4)), (2.0 * r4 - r2, 4.0 * (r2 - r4)), again)
                 for (path, g2, r2, again), (_, g4, r4, _) in zip(units_2, units_4, strict=True))
    attention = []
    for core in spec.paths_with("core_attention"):
        heads = spec.module(core.rpartition(".")[0])
        attention.append((2 * int(heads.fact("n_kv_heads")) * int(heads.fact("head_dim")),
                          bool(spec.module(core).get("causal", True))))
    router = next(iter(spec.paths_with("router")), None)
    info = spec.module(router) if router else None
    block = next(u for u in units if u.path in spec.paths_with("block"))
    return ModelSummary(
        spec=spec, flops=model_flops(spec, request.seq_len), ops=count_ops(model, request.seq_len),
        hidden=next(t.shape[-1] for t in spec.tensors if t.module_path in spec.paths_with("embed")),
        act_bytes=DTYPE_BYTES[dtype], moe_layers=len(experts),
        num_experts=min((int(spec.module(p).fact("num_experts")) for p in experts), default=0),
        top_k=int(info.get("top_k", 1)) if info else 1,
        groups=(int(info.get("n_group", 1)), int(info.get("topk_group", 1))) if info else (1, 1),
        shared_experts=bool(spec.paths_with("shared_experts")), attention=dict(Counter(attention)),
        kv_widths=(sum(w for w, _ in attention), attention[0][0] if attention else 0),
        tensors=tuple((*key, n) for key, n in grouped.items()),
        units=dict(Counter(("experts" if u.path in experts else "dense")
                           if u.reshard_after_forward else
                           ("outer experts" if u.path in experts else "outer") for u in units)),
        param_dtype=block.param_dtype or dtype,
        buffers=buffer_bytes(plan), activations=activations, fsdp=fsdp)


def _expert_shard_dim(m: ModelSummary, mesh: MeshSpec) -> int:
    """plan_fsdp's choice for expert units: dim 1 when there are more shards than local
    experts and dim 1 divides evenly, else dim 0."""
    local = m.num_experts // mesh.ep
    even = all(t[0][1] % mesh.ep_shard == 0 for t in m.tensors
               if t[3].endswith("experts") and len(t[0]) > 1)
    return 1 if mesh.ep_shard > local and even else 0


def _shards(m: ModelSummary, mesh: MeshSpec) -> dict[str, tuple[tuple[tuple[Axis, int], ...],
                                                           FullyShard | None]]:
    """Per kind: the shards of its parameters (EP, then FSDP) and its FSDP unit."""
    rep: tuple[Axis, ...] = ("dp_replicate",) if mesh.dp_replicate > 1 else ()
    dense = FullyShard(stage="fsdp", path="", mesh_dims=(*rep, "dp_shard_cp"))
    out: dict[str, tuple[tuple[tuple[Axis, int], ...], FullyShard | None]] = {
        "dense": ((("dp_shard_cp", 0),), dense), "outer": ((("dp_shard_cp", 0),), dense),
        "unsharded": ((), None)}
    if mesh.ep == 1:  # the experts belong to their blocks' units
        out["experts"] = out["dense"]
    elif mesh.ep_shard == 1 and mesh.dp_replicate == 1:
        out["experts"] = ((("ep", 0),), None)
    else:
        dim = _expert_shard_dim(m, mesh)
        out["experts"] = ((("ep", 0), ("ep_shard", dim)),
                          FullyShard(stage="fsdp", path="", mesh_dims=(*rep, "ep_shard"),
                                     shard_dim=dim))
    return {**out, "outer experts": out["experts"]}


@functools.cache
def _shard_numel(shape: tuple[int, ...], placed: tuple[tuple[Axis, int], ...], unit: FullyShard | None,
                 mesh: MeshSpec) -> int:
    """Elements of one rank's shard of a ``shape`` tensor placed as ``placed`` (padded, when
    an FSDP ``unit`` shards it); shared by the many layouts that differ elsewhere."""
    layout = ParamLayout(name="", shape=shape, shards=placed, unit=None)
    return (fsdp_shard_numel(layout, unit, mesh)[0] if unit is not None
            else math.prod(local_shape(layout, mesh, 0)))


def _sharded(m: ModelSummary, mesh: MeshSpec) -> tuple[dict[str, int], dict[str, int],
                                                       dict[str, int]]:
    """Rank 0's params, grads and AdamW states (bytes), and per kind (`_kinds`) the bytes its
    FSDP units gather and reduce-scatter."""
    shards = _shards(m, mesh)
    held: Counter[str] = Counter()
    gathered: Counter[str] = Counter()
    reduced: Counter[str] = Counter()
    replicas_aside = evolve(mesh, dp_replicate=1)  # no shard depends on dp_replicate
    for shape, dtype, grad, kind, gathers_as, reduces_as, count in m.tensors:
        if kind.endswith("experts") and mesh.ep == 1:  # in their blocks' units
            kind = {"experts": "dense", "outer experts": "outer"}[kind]
        placed, unit = shards[kind]
        numel = _shard_numel(shape, placed, unit, replicas_aside) * count
        width = DTYPE_BYTES[dtype]
        held["params"] += numel * width
        if grad:
            held["grads"] += numel * width
            held["optimizer states"] += numel * width * STATE_COPIES["adamw"]
        if unit is not None:
            gathered[kind] += numel * DTYPE_BYTES[gathers_as]
            reduced[kind] += numel * DTYPE_BYTES[reduces_as] if grad else 0
    return dict(held), dict(gathered), dict(reduced)


def _fsdp_comms(m: ModelSummary, mesh: MeshSpec, reshard: bool, gathered: dict[str, int],
                reduced: dict[str, int]) -> tuple[Comm, ...]:
    """FSDP's collectives per step of one micro-batch (merged as `predict_comm` merges them):
    each unit all-gathered in forward and, if resharded, again in backward; reduce-scattered,
    then all-reduced over ``dp_replicate``."""
    shards = _shards(m, mesh)
    comms: list[Comm] = []
    for kind, g in gathered.items():
        unit = shards[kind][1]
        assert unit is not None
        axes = tuple(a for a in unit.mesh_dims if a != "dp_replicate")
        comms += fsdp_unit_comm(axes, mesh.size(axes[0]), mesh.dp_replicate,
                                m.units.get(kind, 0),
                                2 if reshard and not kind.startswith("outer") else 1,
                                g, reduced.get(kind, 0))
    return merge_comms(comms)


def _times(comms: list[Comm], n: int) -> list[Comm]:
    """``comms`` repeated ``n`` times, merged (`merge_comms`) as ``n`` copies would be."""
    return [evolve(c, calls=c.calls * n, sent=c.sent * n, received=c.received * n,
                   lower_bound=c.lower_bound * n) for c in merge_comms(comms)]


def _ep_cp(m: ModelSummary, layout: Layout, tokens: int) -> tuple[Comm, ...]:
    """EP dispatch of every MoE layer and CP K/V of every attention, one micro-batch, merged
    as `predict_comm` merges them."""
    mesh, out = layout.mesh, []
    forwards = 2 if layout.ac in ("full", "router") else 1
    if mesh.ep > 1:
        rows = expected_rows(tokens, m.num_experts, m.top_k, mesh.ep, 0,
                             layout.ranks_per_node or 1, *m.groups)
        again = 1 + (forwards == 2 and m.shared_experts)
        one = (ag_dispatch_comm(rows, ("ep",), mesh.ep, tokens, m.top_k, m.hidden, m.act_bytes,
                                forwards, again) if layout.dispatch == "all_gather"
               else a2a_dispatch_comm(rows, ("ep",), mesh.ep, layout.ranks_per_node, m.top_k,
                                      m.hidden, m.act_bytes, forwards, again,
                                      num_experts=m.num_experts))
        out += _times(one, m.moe_layers)
    if mesh.cp > 1:
        for (width, causal), n in m.attention.items():
            out += _times(cp_attention_comm("all_gather", tokens * width * m.act_bytes, tokens,
                                            mesh.cp, causal, forwards, m.act_bytes, ("cp",)), n)
        out.append(cp_check_comm(mesh.cp))
    return merge_comms(out)


def _fsdp_buffers(m: ModelSummary, mesh: MeshSpec, reshard: bool) -> tuple[int, int, int]:
    """`fsdp_buffers` of the mesh: each unit's bytes at its ``ep`` (no expert bytes when the
    experts have no FSDP unit)."""
    ep = mesh.ep if mesh.ep == 1 or mesh.ep_shard > 1 or mesh.dp_replicate > 1 else math.inf

    def at(a: float, b: float) -> int:
        return round(a + b / ep)

    return buffers_of([(path, at(*g), at(*r), again and reshard)
                       for path, g, r, again in m.fsdp])


def _activations(m: ModelSummary, layout: Layout, tokens: int, fsdp: tuple[int, int, int]) -> int:
    """The proxy's phases (one real `activation_phases` per AC mode, ``seq_len`` tokens on
    ``dp_shard=4, ep=2``) scaled to ``tokens``, each with its ``fsdp`` buffers
    (`_fsdp_buffers`), the largest; gathered K/V of ``cp`` on top (every attention's without
    AC or with selective AC, else the one recomputed)."""
    proxy_tokens, phases = m.activations[layout.ac]
    mesh = layout.mesh
    kv = 0
    if mesh.cp > 1:
        width = m.kv_widths[0] if layout.ac in ("none", "selective") else m.kv_widths[1]
        kv = width * m.act_bytes * tokens * mesh.cp
    return max(rest * tokens // proxy_tokens + fsdp[which] for rest, which in phases) + kv


def _work(m: ModelSummary, layout: Layout, tokens: int, seq_len: int) -> Work:
    """FLOPs, ops and their bytes of a step of ``micro_batches`` × ``tokens`` (rows of
    ``seq_len``): AC ``full``/``router`` recompute the checkpointed blocks' forward,
    ``selective`` what its policy does not save."""
    passes = 3 + (layout.ac in ("full", "router"))
    per_step = tokens * layout.micro_batches * passes
    ops, micro = m.ops, layout.micro_batches
    elements = ops.forward.elements + ops.backward.elements + {
        "full": ops.checkpointed.elements, "router": ops.checkpointed.elements,
        "selective": ops.checkpointed.elements - ops.saved.elements}.get(layout.ac, 0)
    checkpointed = ops.checkpointed.ops * micro
    return Work(dense_flops=float(m.flops.dense * per_step),
                expert_flops=float(m.flops.expert * per_step), dtype=m.param_dtype,
                ops=(ops.forward.ops + ops.backward.ops) * micro,
                op_bytes=elements * m.act_bytes * tokens / seq_len * micro,
                checkpointed_ops=checkpointed if layout.ac in ("full", "router") else 0,
                selective_ops=checkpointed if layout.ac == "selective" else 0)


def _scored(m: ModelSummary, request: Request, layout: Layout, peak: int, parts: dict[str, int],
            traffic: list[Traffic], tokens: int) -> Scored:
    step = step_time(_work(m, layout, tokens, request.seq_len), traffic, request.profile, request.imbalance,
                     request.overlap)
    per_gpu = request.global_batch_tokens / request.world / step.seconds if step.seconds else 0.0
    return Scored(layout=layout, peak=peak, parts=parts, step=step, tokens_per_s_per_gpu=per_gpu)


def _placed(request: Request, layout: Layout, comms: tuple[Comm, ...]) -> list[Traffic]:
    """Each collective placed on the links its group crosses."""
    return [place(c, layout.mesh, request.gpus_per_node, request.profile, layout.micro_batches,
                  request.imbalance, layout.ranks_per_node) for c in comms]


class ClosedForm:
    """Peaks and step times of layouts without planning them; what several layouts share
    (a mesh's state and FSDP traffic, a dispatch's traffic) is computed once."""

    def __init__(self, m: ModelSummary, request: Request) -> None:
        self.m, self.request = m, request
        self._sharded: dict[MeshSpec, tuple[dict[str, int], dict[str, int], dict[str, int]]] = {}
        # (mesh, reshard) → held state, FSDP's buffers, FSDP's collectives
        self._state: dict[tuple[MeshSpec, bool], tuple[dict[str, int], tuple[int, int, int],
                                                       tuple[Comm, ...]]] = {}
        self._comms: dict[tuple[object, ...], tuple[Comm, ...]] = {}
        self._traffic: dict[tuple[object, ...], list[Traffic]] = {}

    def state(self, layout: Layout) -> tuple[dict[str, int], tuple[int, int, int],
                                             tuple[Comm, ...]]:
        """The layout's held state (bytes), FSDP buffers (`_fsdp_buffers`) and collectives."""
        mesh, reshard = layout.mesh, layout.reshard
        if (mesh, reshard) not in self._state:
            if mesh not in self._sharded:
                self._sharded[mesh] = _sharded(self.m, mesh)
            held, gathered, reduced = self._sharded[mesh]
            self._state[mesh, reshard] = (held, _fsdp_buffers(self.m, mesh, reshard),
                                          _fsdp_comms(self.m, mesh, reshard, gathered, reduced))
        return self._state[mesh, reshard]

    def peak(self, layout: Layout) -> tuple[int, dict[str, int]]:
        """The worst rank's peak bytes and its parts (params, grads, optimizer states,
        activations — or foreach AdamW's temporaries, if larger —, buffers)."""
        tokens = layout.rows * self.request.seq_len // layout.mesh.cp
        held, fsdp, _ = self.state(layout)
        temporaries = held.get("optimizer states", 0) // 2  # foreach AdamW's sqrt(exp_avg_sq)
        activations = _activations(self.m, layout, tokens, fsdp)
        parts = {**held, "activations": max(activations, temporaries),
                 "buffers": self.m.buffers}
        return sum(parts.values()), parts

    def score(self, layout: Layout) -> Scored:
        tokens = layout.rows * self.request.seq_len // layout.mesh.cp
        peak, parts = self.peak(layout)
        mesh, micro = layout.mesh, layout.micro_batches
        fsdp_key = ("fsdp", mesh, layout.reshard, micro)
        if fsdp_key not in self._traffic:
            self._traffic[fsdp_key] = _placed(self.request, layout, self.state(layout)[2])
        forwards = 2 if layout.ac in ("full", "router") else 1
        comms = (mesh.ep, mesh.cp, layout.dispatch, layout.ranks_per_node, forwards, tokens)
        if comms not in self._comms:
            self._comms[comms] = _ep_cp(self.m, layout, tokens)
        key = ("ep_cp", mesh, *comms, micro)
        if key not in self._traffic:
            self._traffic[key] = _placed(self.request, layout, self._comms[comms])
        return _scored(self.m, self.request, layout, peak, parts,
                       self._traffic[fsdp_key] + self._traffic[key], tokens)


def stages(layout: Layout, seq_len: int, precision: Literal["bf16", "fp32"] = "bf16"
            ) -> list[Stage]:
    """The stages `moefn plan` composes for ``layout.argv``."""
    stages: list[Stage] = []
    if layout.mesh.cp > 1:
        stages.append(plan_cp(seq_len=seq_len))
    if layout.mesh.ep > 1:
        stages.append(plan_ep(dispatch=layout.dispatch,  # type: ignore[arg-type]
                              ranks_per_node=layout.ranks_per_node))
    if layout.ac != "none":
        stages.append(plan_ac(mode=layout.ac))
    return [*stages, plan_fsdp(precision=precision, reshard_after_forward=layout.reshard)]


def exact(m: ModelSummary, model: nn.Module, request: Request, layout: Layout) -> Scored:
    """The layout planned with `compose`, its peak from `estimate` on the first and last rank
    (the first only when it is over the budget already) and its collectives from
    `predict_comm` (through `estimate`)."""
    plan = plan_or_raise(compose(*stages(layout, request.seq_len, request.precision))(
        model, layout.mesh))
    ests = []
    for rank in sorted({0, layout.mesh.world_size - 1}):
        ests.append(estimate(plan, rank=rank, seq_len=request.seq_len, rows=layout.rows,
                             imbalance=request.imbalance))
        if (ests[-1].peak or 0) > request.gpu_memory - request.reserve:
            break
    est = max(ests, key=lambda e: e.peak or 0)
    assert est.peak is not None and est.activations is not None
    mem = est.memory
    parts = {"params": sum(v for _, v in mem.params), "grads": sum(v for _, v in mem.grads),
             "optimizer states": sum(v for _, v in mem.optimizer),
             "activations": est.activations.total, "buffers": buffer_bytes(plan)}
    tokens = layout.rows * request.seq_len // layout.mesh.cp
    return _scored(m, request, layout, est.peak, parts, _placed(request, layout, ests[0].comm),
                   tokens)


def _valid(stage: Stage, mesh: MeshSpec, spec: ModelSpec) -> str | None:
    """The stage's own verdict on its option and axis (the first problem's message)."""
    result = stage(ShardPlan.empty(spec, mesh))
    if isinstance(result, Failure):
        problem = result.failure().problems[0]
        return f"plan_{stage.name}: {problem.message}"
    return None


def layouts(request: Request, spec: ModelSpec, rejected: Counter[str]) -> Iterator[Layout]:
    """Every layout of the request the stages accept (the others counted by reason)."""
    world, seq, tokens = request.world, request.seq_len, request.global_batch_tokens
    experts = bool(spec.paths_with("experts"))
    verdicts: dict[tuple[str, object], str | None] = {}

    def verdict(key: tuple[str, object], stage: Stage, mesh: MeshSpec) -> str | None:
        if key not in verdicts:
            verdicts[key] = _valid(stage, mesh, spec)
        return verdicts[key]

    for dp_replicate in divisors(world):
        inner = world // dp_replicate
        for cp in divisors(inner):
            dp_shard = inner // cp
            if cp > 1 and (why := verdict(("cp", cp), plan_cp(seq_len=seq), MeshSpec(cp=cp))):
                rejected[why] += 1
                continue
            rows_options = [r for r in range(1, tokens // (seq * dp_replicate * dp_shard) + 1)
                            if tokens % (seq * r * dp_replicate * dp_shard) == 0]
            if not rows_options:
                rejected["micro-batches per step not a whole number"] += 1
                continue
            for ep in divisors(dp_shard * cp) if experts else (1,):
                mesh = MeshSpec(dp_replicate=dp_replicate, dp_shard=dp_shard, cp=cp, ep=ep)
                for dispatch, rpn in _dispatches(ep, request.gpus_per_node):
                    if ep > 1 and (why := verdict(
                            ("ep", ep, dispatch), plan_ep(dispatch=dispatch,  # type: ignore[arg-type]
                                                          ranks_per_node=rpn),
                            MeshSpec(dp_shard=ep, ep=ep))):
                        rejected[why] += 1
                        continue
                    for ac in AC_MODES:
                        if ac != "none" and (why := verdict(("ac", ac), plan_ac(mode=ac),
                                                            MeshSpec())):
                            rejected[why] += 1
                            continue
                        for reshard in (True, False):
                            for rows in rows_options:
                                yield Layout(mesh=mesh, dispatch=dispatch, ac=ac, reshard=reshard,
                                             rows=rows, ranks_per_node=rpn,
                                             micro_batches=tokens // (seq * rows * dp_replicate
                                                                      * dp_shard))


def _dispatches(ep: int, gpus_per_node: int) -> list[tuple[str, int | None]]:
    if ep == 1:
        return [("none", None)]
    out: list[tuple[str, int | None]] = [("all_to_all", None), ("all_gather", None)]
    if ep > gpus_per_node and ep % gpus_per_node == 0:
        out.append(("hierarchical", gpus_per_node))
    return out


def search(model: nn.Module, request: Request,
           progress: Callable[[str], None] | None = None) -> Result:
    """Rank every valid layout that fits (closed form), then re-plan the best until
    ``request.top`` fit for real (module docstring)."""
    say = progress or (lambda _: None)
    start = time.monotonic()
    spec = inspect_model(model)
    m = summarise(model, request, AC_MODES if spec.paths_with("router") else ("none", "full"))
    say(f"model summarised in {time.monotonic() - start:.1f} s")
    rejected: Counter[str] = Counter()
    budget = request.gpu_memory - request.reserve
    closed = ClosedForm(m, request)
    fitting: list[Scored] = []
    closest: list[tuple[int, Layout, dict[str, int]]] = []
    searched = 0
    for group in _by_rows(layouts(request, spec, rejected)):
        if group[0].ac not in m.activations:
            rejected["plan_ac: no router to replay"] += len(group)
            continue
        searched += len(group)
        # most rows first: the peak grows with rows, the step time never does (fewer
        # micro-batches: fewer FSDP gathers, calls and kernels for the same FLOPs and rows)
        for i, layout in enumerate(group):
            peak, parts = closed.peak(layout)
            if peak <= budget:
                fitting.append(closed.score(layout))
                rejected["fewer rows per micro-batch than one that fits"] += len(group) - i - 1
                break
            rejected[f"does not fit (largest part: {max(parts, key=parts.__getitem__)})"] += 1
            if len(closest) < 3 or peak < closest[-1][0]:
                closest = sorted([*closest, (peak, layout, parts)], key=lambda c: c[0])[:3]
    say(f"{searched} layouts scored, {len(fitting)} fit, in {time.monotonic() - start:.1f} s")
    fitting.sort(key=lambda s: s.step.seconds)
    checked: list[Checked] = []
    for scored in fitting[:4 * request.top]:
        if len(checked) == request.top:
            break
        real = exact(m, model, request, scored.layout)
        if real.peak <= budget:
            checked.append(Checked(exact=real, closed=scored))
        else:
            rejected["fits by the closed form only"] += 1
    checked.sort(key=lambda c: c.exact.step.seconds)
    say(f"{len(checked)} re-planned in {time.monotonic() - start:.1f} s")
    near = tuple(closed.score(layout) for _, layout, _ in closest) if not checked else ()
    return Result(layouts=tuple(checked), rejected=dict(rejected), closest=near,
                  searched=searched)


def _by_rows(found: Iterator[Layout]) -> Iterator[list[Layout]]:
    """Layouts that differ in rows only, most rows first (`layouts` yields them together)."""
    for _, group in itertools.groupby(found, key=lambda g: (g.mesh, g.dispatch, g.ac, g.reshard,
                                                            g.ranks_per_node)):
        yield sorted(group, key=lambda g: -g.rows)
