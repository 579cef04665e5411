"""Per-step communication of one rank, predicted from a plan (pure; no GPU, no ranks).

Every collective a training step (forward, backward and recompute) runs is predicted with its
mesh group, its number of calls and the logical payload the rank sends and receives — the
measure `moefn.analyse.ledger.CommLedger` counts on a real run (all-gather and reduce-scatter of an
``s``-byte shard over ``n`` ranks: ``s·(n−1)`` each way; all-reduce of ``b`` bytes:
``2·b·(n−1)//n``; all-to-all: the rows that leave or reach the rank).

- FSDP: per unit, each parameter's shard padded as FSDP2 pads it; all-gathered once in forward
  and again in backward unless the unit keeps it unsharded; reduce-scattered once (trainable
  parameters, in the reduce dtype), then all-reduced over ``dp_replicate`` (HSDP). A unit whose
  shard group has one rank runs no all-gather or reduce-scatter.
- EP, for ``tokens`` per rank and ``top_k``: the all-to-all dispatchers exchange routing
  counts, then one row per (token, destination rank) with the expert ids inside it — per
  (token, destination node) and then within the node when hierarchical — and one result row
  back; the rows are those of a given routing or the exact expectation for uniform routing,
  group-limited when the router is (its ``n_group``/``topk_group`` facts;
  `moefn.analyse.dispatch_rows`). The all-gather dispatcher gathers tokens with their weights
  and routing, and reduce-scatters results. Backward repeats the row exchanges for gradients.
- CP: each attention all-gathers K and V (and the global positions when causal), and
  reduce-scatters their gradients; or, with the ring (``comm="p2p"``), all-gathers only the
  positions (causal) and sends K/V blocks ``cp−1`` times in forward and again in backward,
  where each block's dK/dV accumulator (fp32) follows it ``cp`` times back to its owner (every
  send has its receive on the same rank: `ring_comm`); realize's input check
  (``check_inputs=True``, the default) all-gathers a 200-byte shape signature over ``cp`` once
  per forward.
- TP, for ``tokens`` per rank split on the sequence over ``tp``: every attention and dense MLP
  all-gathers its input's chunks in forward and reduce-scatters their gradient in backward;
  every row-wise linear (and the embedding) reduce-scatters its partial sums in forward and
  all-gathers their gradient; lm_head gathers like an attention, once per call (MTP calls it
  again). MoE layers see ``tokens / tp`` tokens, CP attention ``1/tp`` of the K/V heads. A
  checkpointed block re-runs them all but a dense MLP's last scatter (nothing after it is saved).
- A block checkpointed in "full" or "router" mode runs its forward collectives again in
  backward (EP and CP; FSDP units are not gathered again), up to the last one whose result
  backward needs; "selective" keeps them.

``lower_bound`` is what the same data movement needs with no padding, no second all-gather,
no recompute and no routing metadata.

>>> import torch
>>> from moefn import MeshSpec, compose, plan_ep, plan_fsdp
>>> from moefn.adapters.reference import MoETransformer, get_preset
>>> with torch.device("meta"):
...     model = MoETransformer(get_preset("tiny"))
>>> plan = compose(plan_ep(), plan_fsdp())(model, MeshSpec(dp_shard=4, ep=2)).unwrap()
>>> comm = predict_comm(plan, tokens=4096, top_k=2, hidden=64, activation_bytes=4)
>>> sorted({c.collective for c in comm})  # doctest: +ELLIPSIS
[...'ep dispatch + combine'...]
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from fractions import Fraction
from typing import Literal

from attrs import evolve, frozen

from moefn.analyse.dispatch_rows import DispatchRows, expected_rows
from moefn.analyse.layout import (
    ParamLayout,
    fsdp_shard_numel,
    fsdp_shard_ranks,
    local_shape,
    param_layouts,
)
from moefn.plan.dtypes import DTYPE_BYTES
from moefn.plan.mesh import Axis
from moefn.plan.records import (
    ActivationCheckpoint,
    ContextParallelAttention,
    FullyShard,
    InstallDispatch,
    KeepDtype,
    ShardPlan,
    SyncGradients,
    TensorParallel,
)
from moefn.plan.tp_heads import local_kv_heads

MAX_TENSORS = 8  # tensor arguments realize's input check compares (a forward rarely takes more)
SIGNATURE_BYTES = 8 * (1 + 3 * MAX_TENSORS)  # its all-gather: int64 count, (ndim, dim 0, dim 1) each

Op = Literal["all_gather", "reduce_scatter", "all_reduce", "all_to_all", "send", "recv"]
Hop = Literal["across nodes", "within node"]  # the two hops of hierarchical dispatch
_INDEX_BYTES = 8  # routing counts, expert indices and positions travel as int64


@frozen(kw_only=True)
class Comm:
    """One collective of one purpose on one mesh group, per step on one rank (bytes); a
    hierarchical dispatch ``hop`` runs on a part of its axes' group (`group_ranks`)."""

    collective: str
    op: Op
    axes: tuple[Axis, ...]
    calls: int
    sent: int
    received: int
    lower_bound: int
    hop: Hop | None = None


def _traffic(collective: str, op: Op, axes: tuple[Axis, ...], calls: int, each_way: int,
             lower_bound: int, hop: Hop | None = None) -> Comm:
    return Comm(collective=collective, op=op, axes=axes, calls=calls, sent=each_way,
                received=each_way, lower_bound=lower_bound, hop=hop)


def merge_comms(comms: Iterable[Comm]) -> tuple[Comm, ...]:
    """Sum records of the same collective, op and group (first-seen order)."""
    merged: dict[tuple[str, str, tuple[str, ...]], Comm] = {}
    for c in comms:
        key = (c.collective, c.op, c.axes)
        was = merged.get(key)
        merged[key] = c if was is None else evolve(
            was, calls=was.calls + c.calls, sent=was.sent + c.sent,
            received=was.received + c.received, lower_bound=was.lower_bound + c.lower_bound)
    return tuple(merged.values())



def _fsdp(plan: ShardPlan) -> list[Comm]:
    layouts = param_layouts(plan)
    tensors = {t.name: t for t in plan.model.tensors}
    by_unit: dict[str | None, list[ParamLayout]] = {}
    for layout in layouts.values():
        by_unit.setdefault(layout.unit, []).append(layout)
    out: list[Comm] = []
    for unit in plan.steps_of(FullyShard):
        owned = by_unit.get(unit.path, [])
        n = fsdp_shard_ranks(unit, plan.mesh)
        replicas = plan.mesh.dp_replicate if "dp_replicate" in unit.mesh_dims else 1
        shard_axes = tuple(a for a in unit.mesh_dims if a != "dp_replicate")
        gathered = padded_rs = exact_ag = exact_rs = 0
        for layout in owned:
            padded, exact = fsdp_shard_numel(layout, unit, plan.mesh)
            dtype = tensors[layout.name].dtype
            param_bytes = DTYPE_BYTES[unit.param_dtype or dtype]
            gathered += padded * param_bytes
            exact_ag += exact * param_bytes
            if tensors[layout.name].requires_grad:
                grad_bytes = DTYPE_BYTES[unit.reduce_dtype or unit.param_dtype or dtype]
                padded_rs += padded * grad_bytes
                exact_rs += exact * grad_bytes
        if owned:
            out += fsdp_unit_comm(shard_axes, n, replicas, 1,
                                  2 if unit.reshard_after_forward else 1,
                                  gathered, padded_rs, exact_ag, exact_rs)
    return out


def fsdp_unit_comm(axes: tuple[Axis, ...], n: int, replicas: int, units: int, gathers: int,
                   gathered: int, reduced: int, exact_gathered: int = 0,
                   exact_reduced: int = 0) -> list[Comm]:
    """FSDP's collectives for ``units`` units sharded over ``n`` ranks of ``axes`` holding
    ``gathered`` / ``reduced`` bytes of (padded) shards between them: each all-gathered
    ``gathers`` times per step, gradients reduce-scattered, then all-reduced over
    ``replicas``; ``exact_*`` (unpadded) give the lower bounds."""
    out = []
    if n > 1:
        out.append(_traffic("fsdp all-gather", "all_gather", axes, units * gathers,
                            gathers * gathered * (n - 1), exact_gathered * (n - 1)))
        if reduced:
            out.append(_traffic("fsdp reduce-scatter", "reduce_scatter", axes, units,
                                reduced * (n - 1), exact_reduced * (n - 1)))
    if replicas > 1 and reduced:
        out.append(_traffic("fsdp all-reduce over replicas", "all_reduce", ("dp_replicate",),
                            units, 2 * reduced * (replicas - 1) // replicas,
                            2 * exact_reduced * (replicas - 1) // replicas))
    return out


def _sync(plan: ShardPlan) -> list[Comm]:
    """One all-reduce per trainable parameter: without FSDP over its deepest `SyncGradients`
    step's axes, and for a parameter kept out of FSDP over its `KeepDtype` step's axes."""
    steps = sorted(plan.steps_of(SyncGradients), key=lambda s: -len(s.path))
    kept = {f"{s.path}.{p}" if s.path else p: s.mesh_dims
            for s in plan.steps_of(KeepDtype) for p in s.params}
    layouts = param_layouts(plan)
    out = []
    for info in plan.model.tensors:
        if info.is_buffer or not info.requires_grad or info.name not in layouts:
            continue
        step = next((s for s in steps if s.path == "" or info.name.startswith(s.path + ".")),
                    None)
        dims = kept.get(info.name, step.mesh_dims if step is not None else None)
        if dims is None:
            continue
        n = math.prod(plan.mesh.size(a) for a in dims)
        size = math.prod(local_shape(layouts[info.name], plan.mesh, 0)) * DTYPE_BYTES[info.dtype]
        moved = 2 * size * (n - 1) // n
        out.append(_traffic("gradient all-reduce", "all_reduce", dims, 1, moved, moved))
    return out


def _recomputed(plan: ShardPlan, path: str) -> bool:
    """Whether a checkpointed block re-runs the collectives under ``path`` in backward."""
    return any(c.mode in ("full", "router") and (c.path == "" or path.startswith(c.path + "."))
               for c in plan.steps_of(ActivationCheckpoint))


def _shared_experts_follow(plan: ShardPlan, experts: str) -> bool:
    """Whether the MoE holding ``experts`` has shared experts (they run after the routed ones)."""
    moe = experts.rpartition(".")[0]
    return any(p.rpartition(".")[0] == moe for p in plan.model.paths_with("shared_experts"))


def _groups(plan: ShardPlan, experts: str) -> tuple[int, int]:
    """``(n_group, topk_group)`` of the router beside ``experts`` (``(1, 1)``: not grouped)."""
    moe = experts.rpartition(".")[0]
    router = next((plan.model.module(p) for p in plan.model.paths_with("router")
                   if p.rpartition(".")[0] == moe), None)
    if router is None:
        return 1, 1
    return int(router.get("n_group", 1)), int(router.get("topk_group", 1))


def _row_bytes(rows: Fraction, width: int) -> int:
    return round(rows * width)


def _id_bytes(top_k: int, num_experts: int, act: int) -> int:
    """Bytes of the ``top_k`` expert ids in a dispatched row: int16 (int32 past 32767 experts),
    padded to whole ``act``-byte columns."""
    raw = top_k * (2 if num_experts <= 32767 else 4)
    return -(-raw // act) * act


def a2a_dispatch_comm(rows: DispatchRows, axes: tuple[Axis, ...], ep: int,
                      ranks_per_node: int | None, top_k: int, hidden: int, act: int, forwards: int = 1,
                      returns: int = 1, *, num_experts: int) -> list[Comm]:
    """The all-to-all dispatch of one MoE layer moving ``rows``: per hop (the ep group, or when
    ``ranks_per_node`` is given, i.e. hierarchical, across nodes and within the node), the
    counts (one int64 per group rank), the rows (token, ``K`` weights and the ``K`` expert ids'
    columns) and the returned sums (``H``); backward returns the rows' gradients (all columns)
    and sends the sums' gradients. ``forwards`` counts runs of the forward (2 with
    recompute), ``returns`` those reaching the sums' exchange (recompute stops at the last
    tensor backward saves).

    >>> from moefn.analyse.dispatch_rows import expected_rows
    >>> rows = expected_rows(4096, num_experts=16, top_k=2, ep=2, ep_rank=0)
    >>> [(c.collective, c.received) for c in a2a_dispatch_comm(rows, ("ep",), 2, None, 2, 256, 4,
    ...                                                        num_experts=16)]
    [('ep routing counts', 8), ('ep dispatch + combine', 12937899)]
    """
    hops: list[tuple[Hop | None, int, Fraction, Fraction]] = [(None, ep, rows.sent, rows.received)]
    if ranks_per_node is not None:
        hops = [("across nodes", ep // ranks_per_node, rows.sent, rows.received),
                ("within node", ranks_per_node, rows.sent_in_node, rows.received_in_node)]
    out = []
    ids = _id_bytes(top_k, num_experts, act) // act
    for hop, size, sent, received in hops:
        dispatch, back, where = hidden + top_k + ids, hidden, f" {hop}" if hop else ""
        out += [
            _traffic(f"ep routing counts{where}", "all_to_all", axes, forwards,
                     forwards * _INDEX_BYTES * (size - 1), 0, hop),
            Comm(collective=f"ep dispatch + combine{where}", op="all_to_all", axes=axes, hop=hop,
                 calls=forwards + returns + 2,
                 sent=_row_bytes(forwards * sent * dispatch + returns * received * back
                                 + sent * back + received * dispatch, act),
                 received=_row_bytes(forwards * received * dispatch + returns * sent * back
                                     + received * back + sent * dispatch, act),
                 lower_bound=2 * _row_bytes(sent + received, hidden * act))]
    return out


def _ep(plan: ShardPlan, tokens: int, top_k: int, hidden: int, act: int, rank: int,
        rows: DispatchRows | None) -> list[Comm]:
    out = []
    for step in plan.steps_of(InstallDispatch):
        ep, axes = plan.mesh.size("ep"), step.mesh_dims
        forwards = 2 if _recomputed(plan, step.path) else 1
        moved = rows or expected_rows(tokens, step.num_experts, top_k, ep,
                                      plan.mesh.coordinate(rank, "ep"), step.ranks_per_node or 1,
                                      *_groups(plan, step.path))
        if step.kind != "all_gather":
            # recompute stops at the last tensor backward saves: the sums' exchange runs
            # again only when shared experts follow
            returns = 1 + (forwards == 2 and _shared_experts_follow(plan, step.path))
            out += a2a_dispatch_comm(moved, axes, ep, step.ranks_per_node, top_k, hidden, act,
                                     forwards, returns, num_experts=step.num_experts)
            continue
        # recompute stops once every saved tensor is back (torch's early stop): the results'
        # reduce-scatter is last unless shared experts run after the routed ones
        scatters = 1 + (forwards == 2 and _shared_experts_follow(plan, step.path))
        out += ag_dispatch_comm(moved, axes, ep, tokens, top_k, hidden, act, forwards, scatters)
    return out


def ag_dispatch_comm(rows: DispatchRows, axes: tuple[Axis, ...], ep: int, tokens: int,
                     top_k: int, hidden: int, act: int, forwards: int = 1,
                     scatters: int = 1) -> list[Comm]:
    """The all-gather dispatch of one MoE layer for ``tokens`` per rank: tokens with their
    weights, sizes and expert indices gathered ``forwards`` times, results reduce-scattered
    ``scatters`` times; backward scatters the tokens' gradients and gathers the results'.
    ``rows`` (what all-to-all would move) gives the lower bound."""
    lower = 2 * _row_bytes(rows.sent + rows.received, hidden * act)
    peers = ep - 1
    packed = tokens * (hidden + top_k) * act * peers  # tokens with their routing weights
    meta = _INDEX_BYTES * peers + tokens * top_k * _INDEX_BYTES * peers  # sizes, indices
    results = tokens * hidden * act * peers
    return [_traffic("ep all-gather: tokens, weights, routing", "all_gather", axes,
                     3 * forwards + 1, forwards * (packed + meta) + results, lower // 2),
            _traffic("ep reduce-scatter: results, token grads", "reduce_scatter", axes,
                     scatters + 1, scatters * results + packed, lower // 2)]


def ring_comm(kv: int, tokens: int, cp: int, causal: bool, forwards: int, act: int,
              axes: tuple[Axis, ...]) -> list[Comm]:
    """One ring attention's step: ``kv`` bytes of local K+V, ``tokens`` local tokens, its forward
    run ``forwards`` times (2 under full/router recompute); dK/dV travel in fp32.

    >>> [(c.op, c.calls, c.sent, c.received)
    ...  for c in ring_comm(kv=100, tokens=5, cp=4, causal=True, forwards=1, act=2, axes=("cp",))]
    [('all_gather', 1, 120, 120), ('send', 10, 1400, 0), ('recv', 10, 0, 1400)]
    """
    grads = kv // act * 4
    sends = (forwards + 1) * (cp - 1)
    moved = sends * kv + cp * grads
    out = [_traffic("cp ring positions all-gather", "all_gather", axes, forwards,
                    forwards * tokens * _INDEX_BYTES * (cp - 1), 0)] if causal else []
    return [*out,
            Comm(collective="cp ring K/V (+dK/dV) send", op="send", axes=axes,
                 calls=sends + cp, sent=moved, received=0, lower_bound=2 * kv * (cp - 1)),
            Comm(collective="cp ring K/V (+dK/dV) receive", op="recv", axes=axes,
                 calls=sends + cp, sent=0, received=moved, lower_bound=0)]


def _cp(plan: ShardPlan, tokens: int, act: int) -> list[Comm]:
    out = []
    for step in plan.steps_of(ContextParallelAttention):
        cp, axes = math.prod(plan.mesh.size(a) for a in step.mesh_dims), step.mesh_dims
        heads = plan.model.module(step.path.rpartition(".")[0])
        causal = bool(plan.model.module(step.path).get("causal", True))
        kv_heads = local_kv_heads(int(heads.fact("n_heads")), int(heads.fact("n_kv_heads")),
                                  plan.mesh.tp)  # tp: the heads this rank computes
        kv = 2 * tokens * kv_heads * int(heads.fact("head_dim")) * act
        forwards = 2 if _recomputed(plan, step.path) else 1
        out += cp_attention_comm(step.comm, kv, tokens, cp, causal, forwards, act, axes)
    if out:
        out.append(cp_check_comm(plan.mesh.size("cp")))
    return out


def cp_attention_comm(comm: str, kv: int, tokens: int, cp: int, causal: bool, forwards: int,
                      act: int, axes: tuple[Axis, ...]) -> list[Comm]:
    """One context-parallel attention's step (``kv`` bytes of local K+V): the ring
    (`ring_comm`) or K/V (and causal positions) all-gathered ``forwards`` times and their
    gradients reduce-scattered."""
    if comm == "p2p":
        return ring_comm(kv, tokens, cp, causal, forwards, act, axes)
    gathered = kv * (cp - 1) + (tokens * _INDEX_BYTES * (cp - 1) if causal else 0)
    return [_traffic("cp K/V all-gather", "all_gather", axes, forwards * (2 + causal),
                     forwards * gathered, kv * (cp - 1)),
            _traffic("cp K/V gradient reduce-scatter", "reduce_scatter", axes, 2,
                     kv * (cp - 1), kv * (cp - 1))]


def cp_check_comm(cp: int) -> Comm:
    """realize's input check (on by default): one small all-gather per root forward."""
    return _traffic("cp input shape check", "all_gather", ("cp",), 1,
                    SIGNATURE_BYTES * (cp - 1), 0)


def _tp(plan: ShardPlan, tokens: int, hidden: int, act: int) -> list[Comm]:
    tp = plan.mesh.tp
    moved = tokens // tp * hidden * act * (tp - 1)  # one rank's chunk to or from each peer
    out = []
    for step in plan.steps_of(TensorParallel):
        # a dense MLP's row-wise output ends its block: recompute stops before its scatter
        ends = step.style == "rowwise" and "dense_mlp" in plan.model.module(
            step.path.rpartition(".")[0]).roles
        forwards = 2 if _recomputed(plan, step.path) and not ends else 1
        calls = 1 + bool(plan.model.paths_with("mtp")) if step.style == "vocab_head" else 1
        if step.style in ("gather", "vocab_head"):
            out += [_traffic("tp sequence all-gather", "all_gather", ("tp",), calls * forwards,
                             calls * forwards * moved, calls * moved),
                    _traffic("tp gradient reduce-scatter", "reduce_scatter", ("tp",), calls,
                             calls * moved, calls * moved)]
        elif step.style in ("rowwise", "vocab_embed"):
            out += [_traffic("tp partial-sum reduce-scatter", "reduce_scatter", ("tp",), forwards,
                             forwards * moved, moved),
                    _traffic("tp gradient all-gather", "all_gather", ("tp",), 1, moved, moved)]
    return out


def group_ranks(plan: ShardPlan, rank: int, comm: Comm) -> tuple[int, ...]:
    """The global ranks of the group ``comm`` runs on from ``rank``: its axes' group, or for a
    hierarchical hop the part of it on ``rank``'s node (within) or at ``rank``'s index in
    every node (across), as realize splits the ep group into nodes of consecutive ranks.

    >>> import torch
    >>> from moefn import MeshSpec, compose, plan_ep
    >>> from moefn.adapters.reference import MoETransformer, get_preset
    >>> with torch.device("meta"):
    ...     model = MoETransformer(get_preset("tiny"))
    >>> plan = compose(plan_ep(dispatch="hierarchical", ranks_per_node=2))(
    ...     model, MeshSpec(dp_shard=4, ep=4)).unwrap()
    >>> {c.hop: group_ranks(plan, 1, c) for c in predict_comm(
    ...     plan, tokens=8, top_k=2, hidden=64, activation_bytes=4) if c.op == "all_to_all"}
    {'across nodes': (1, 3), 'within node': (0, 1)}
    """
    members = plan.mesh.group_ranks(rank, comm.axes)
    if comm.hop is None:
        return members
    per_node = next(s.ranks_per_node for s in plan.steps_of(InstallDispatch) if s.ranks_per_node)
    i = members.index(rank)
    if comm.hop == "across nodes":
        return members[i % per_node::per_node]
    return members[i - i % per_node:i - i % per_node + per_node]


def predict_comm(plan: ShardPlan, tokens: int, top_k: int, hidden: int,
                 activation_bytes: int, rank: int = 0,
                 rows: DispatchRows | None = None) -> tuple[Comm, ...]:
    """Every collective of one training step on ``rank`` with ``tokens`` local tokens; the
    all-to-all dispatch moves ``rows`` per MoE layer (default: expected for uniform routing,
    `moefn.analyse.dispatch_rows.expected_rows`)."""
    tp = plan.mesh.tp
    return merge_comms([*_fsdp(plan), *_sync(plan),
                   *_ep(plan, tokens // tp, top_k, hidden, activation_bytes, rank, rows),
                   *_cp(plan, tokens, activation_bytes),
                   *_tp(plan, tokens, hidden, activation_bytes)])
