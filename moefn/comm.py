"""Per-step communication of one rank, predicted from a plan (pure; no GPU, no ranks).

Every collective a training step (forward, backward and recompute) runs is predicted with its
mesh group, its number of calls and the logical payload the rank sends and receives — the
measure `moefn.comm_ledger.CommLedger` counts on a real run (all-gather and reduce-scatter of an
``s``-byte shard over ``n`` ranks: ``s·(n−1)`` each way; all-reduce of ``b`` bytes:
``2·b·(n−1)//n``; all-to-all: the rows that leave or reach the rank).

- FSDP: per unit, each parameter's shard padded as FSDP2 pads it; all-gathered once in forward
  and again in backward unless the unit keeps it unsharded; reduce-scattered once (trainable
  parameters, in the reduce dtype), then all-reduced over ``dp_replicate`` (HSDP). A unit whose
  shard group has one rank runs no all-gather or reduce-scatter.
- EP, for ``tokens`` per rank and ``top_k``, assuming balanced routing (each rank of the EP
  group gets ``1/ep`` of every rank's (token, expert) pairs — exact when ``tokens·top_k`` is a
  multiple of ep): the all-to-all dispatcher exchanges routing counts, then tokens and results;
  the all-gather dispatcher gathers tokens with their weights and routing, and reduce-scatters
  results. Backward repeats the row exchanges for gradients.
- CP: each attention all-gathers K and V (and the global positions when causal), and
  reduce-scatters their gradients; or, with the ring (``comm="p2p"``), all-gathers only the
  positions (causal) and sends K/V blocks ``cp−1`` times in forward and again in backward,
  where each block's dK/dV accumulator (fp32) follows it ``cp`` times back to its owner (every
  send has its receive on the same rank: `ring_comm`); realize's input check (``check_inputs=True``, the default)
  all-gathers a 200-byte shape signature over ``cp`` once per forward.
- A block checkpointed in "full" or "router" mode runs its forward collectives again in
  backward (EP and CP; FSDP units are not gathered again), up to the last one whose result
  backward needs; "selective" keeps them.

``lower_bound`` is what the same data movement needs with no padding, no second all-gather,
no recompute and no routing metadata.

>>> comm = predict_comm(plan, tokens=4096, top_k=8, activation_bytes=2)   # doctest: +SKIP
>>> [(c.collective, c.received) for c in comm]                           # doctest: +SKIP
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Literal

from attrs import evolve, frozen

from moefn.layout import fsdp_shard_numel, fsdp_shard_ranks, local_shape, param_layouts
from moefn.plan import (
    Checkpoint,
    ContextParallelAttention,
    FullyShard,
    InstallDispatch,
    ShardPlan,
    SyncGradients,
)
from moefn.runtime.input_check import SIGNATURE_BYTES

Op = Literal["all_gather", "reduce_scatter", "all_reduce", "all_to_all", "send", "recv"]
DTYPE_BYTES: dict[str, int] = {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8,
                               "int64": 8, "int32": 4, "int8": 1, "uint8": 1}
_INDEX_BYTES = 8  # routing counts, expert indices and positions travel as int64


@frozen(kw_only=True)
class Comm:
    """One collective of one purpose on one mesh group, per step on one rank (bytes)."""

    collective: str
    op: Op
    axes: tuple[str, ...]
    calls: int
    sent: int
    received: int
    lower_bound: int


def _traffic(collective: str, op: Op, axes: tuple[str, ...], calls: int, each_way: int,
             lower_bound: int) -> Comm:
    return Comm(collective=collective, op=op, axes=axes, calls=calls, sent=each_way,
                received=each_way, lower_bound=lower_bound)


def _merge(comms: Iterable[Comm]) -> tuple[Comm, ...]:
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
    out: list[Comm] = []
    for unit in plan.steps_of(FullyShard):
        owned = [layout for layout in layouts.values() if layout.unit == unit.path]
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
        if not owned:
            continue
        if n > 1:
            gathers = 2 if unit.reshard_after_forward else 1
            out.append(_traffic("fsdp all-gather", "all_gather", shard_axes, gathers,
                                gathers * gathered * (n - 1), exact_ag * (n - 1)))
            if padded_rs:
                out.append(_traffic("fsdp reduce-scatter", "reduce_scatter", shard_axes, 1,
                                    padded_rs * (n - 1), exact_rs * (n - 1)))
        if replicas > 1 and padded_rs:
            moved = 2 * padded_rs * (replicas - 1) // replicas
            out.append(_traffic("fsdp all-reduce over replicas", "all_reduce", ("dp_replicate",),
                                1, moved, 2 * exact_rs * (replicas - 1) // replicas))
    return out


def _sync(plan: ShardPlan) -> list[Comm]:
    """Without FSDP: one all-reduce per trainable parameter, over its deepest step's axes."""
    steps = sorted(plan.steps_of(SyncGradients), key=lambda s: -len(s.path))
    layouts = param_layouts(plan)
    out = []
    for info in plan.model.tensors:
        if info.is_buffer or not info.requires_grad or info.name not in layouts:
            continue
        step = next((s for s in steps if s.path == "" or info.name.startswith(s.path + ".")),
                    None)
        if step is None:
            continue
        n = math.prod(plan.mesh.size(a) for a in step.mesh_dims)
        size = math.prod(local_shape(layouts[info.name], plan.mesh, 0)) * DTYPE_BYTES[info.dtype]
        moved = 2 * size * (n - 1) // n
        out.append(_traffic("gradient all-reduce", "all_reduce", step.mesh_dims, 1, moved, moved))
    return out


def _recomputed(plan: ShardPlan, path: str) -> bool:
    """Whether a checkpointed block re-runs the collectives under ``path`` in backward."""
    return any(c.mode in ("full", "router") and (c.path == "" or path.startswith(c.path + "."))
               for c in plan.steps_of(Checkpoint))


def _shared_experts_follow(plan: ShardPlan, experts: str) -> bool:
    """Whether the MoE holding ``experts`` has shared experts (they run after the routed ones)."""
    moe = experts.rpartition(".")[0]
    return any(p.rpartition(".")[0] == moe for p in plan.model.paths_with("shared_experts"))


def _ep(plan: ShardPlan, tokens: int, top_k: int, hidden: int, act: int) -> list[Comm]:
    out = []
    for step in plan.steps_of(InstallDispatch):
        ep, axes = plan.mesh.size("ep"), step.mesh_dims
        forwards = 2 if _recomputed(plan, step.path) else 1
        rows = tokens * top_k * (ep - 1) // ep  # (token, expert) rows that leave the rank
        lower = 4 * rows * hidden * act
        if step.kind == "all_to_all":
            counts = step.num_experts // ep * _INDEX_BYTES * (ep - 1)
            out.append(_traffic("ep routing counts", "all_to_all", axes, forwards,
                                forwards * counts, 0))
            out.append(_traffic("ep dispatch + combine", "all_to_all", axes, 2 * forwards + 2,
                                (forwards + 1) * 2 * rows * hidden * act, lower))
            continue
        peers = ep - 1
        packed = tokens * (hidden + top_k) * act * peers  # tokens with their routing weights
        meta = _INDEX_BYTES * peers + tokens * top_k * _INDEX_BYTES * peers  # sizes, indices
        results = tokens * hidden * act * peers
        # recompute stops once every saved tensor is back (torch's early stop): the results'
        # reduce-scatter is last unless shared experts run after the routed ones
        scatters = 1 + (forwards == 2 and _shared_experts_follow(plan, step.path))
        out.append(_traffic("ep all-gather: tokens, weights, routing", "all_gather", axes,
                            3 * forwards + 1, forwards * (packed + meta) + results, lower // 2))
        out.append(_traffic("ep reduce-scatter: results, token grads", "reduce_scatter", axes,
                            scatters + 1, scatters * results + packed, lower // 2))
    return out


def ring_comm(kv: int, tokens: int, cp: int, causal: bool, forwards: int, act: int,
              axes: tuple[str, ...]) -> list[Comm]:
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
        kv = 2 * tokens * int(heads.fact("n_kv_heads")) * int(heads.fact("head_dim")) * act
        gathered = kv * (cp - 1) + (tokens * _INDEX_BYTES * (cp - 1) if causal else 0)
        forwards = 2 if _recomputed(plan, step.path) else 1
        if step.comm == "p2p":
            out += ring_comm(kv, tokens, cp, causal, forwards, act, axes)
            continue
        out.append(_traffic("cp K/V all-gather", "all_gather", axes, forwards * (2 + causal),
                            forwards * gathered, kv * (cp - 1)))
        out.append(_traffic("cp K/V gradient reduce-scatter", "reduce_scatter", axes, 2,
                            kv * (cp - 1), kv * (cp - 1)))
    if out:  # realize's input check (on by default): one small all-gather per root forward
        cp = plan.mesh.size("cp")
        out.append(_traffic("cp input shape check", "all_gather", ("cp",), 1,
                            SIGNATURE_BYTES * (cp - 1), 0))
    return out


def predict_comm(plan: ShardPlan, tokens: int, top_k: int, hidden: int,
                 activation_bytes: int) -> tuple[Comm, ...]:
    """Every collective of one training step on one rank with ``tokens`` local tokens."""
    return _merge([*_fsdp(plan), *_sync(plan),
                   *_ep(plan, tokens, top_k, hidden, activation_bytes),
                   *_cp(plan, tokens, activation_bytes)])
