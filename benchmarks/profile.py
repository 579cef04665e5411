"""Where a step's time goes, moefn next to transformers: the torch profiler on the peer
benchmark's setup (`benchmarks.peer`, SGD, ep 2), 3 profiled steps after 3 warm-up steps, on rank 0
and rank 3, the CPU time of the main thread split into categories (milliseconds per step).

An op's own time goes to the first category that matches it or, failing that, an enclosing op
(FSDP's collectives keep everything inside them, e.g. the all-to-all of a gloo reduce-scatter);
Python frames (``with_stack``) are events too, so an op inside a system's dispatch or expert
code is charged there; an autograd backward node inherits the category of the forward op that
recorded it (same sequence number). "python and other" is Python's own time outside every
category plus the wall time no event accounts for. EP dispatch is split into its compute and
its all-to-all waits (``wait_tensor`` or ``Work.wait`` and all inside it); the rank skew is, summed over the
all-to-alls, how much longer this rank waited than the EP group's shortest wait for the same
call: time spent waiting for a later peer rather than moving bytes (part of the waits).

>>> python -m benchmarks.run --profile                    # doctest: +SKIP
"""

from __future__ import annotations

import os
import tempfile
import time
from collections import Counter
from typing import Any

import torch
import torch.distributed as dist
from torch.autograd.profiler_util import FunctionEvent
from torch.profiler import ProfilerActivity, profile

from benchmarks import peer
from moefn import MeshSpec
from moefn.adapters.reference import causal_lm_loss
from moefn.launch import run_local
from moefn.train.loop import local_batch

SYSTEMS = ("transformers", "moefn all_to_all")
RANKS = (0, 3)
STEPS, EP = 3, 2
# (category, op-name fragments, Python stack fragments); the first match wins
CATEGORIES: tuple[tuple[str, tuple[str, ...], tuple[str, ...]], ...] = (
    ("optimizer", ("Optimizer.",), ()),
    ("FSDP all-gather/reduce-scatter (incl. waits)",
     ("FSDP::", "fsdp::", "RegisterPostBackwardFunction", "c10d::_allgather_base_",
      "c10d::_reduce_scatter_base_", "moefn::reduce_scatter_by_all_to_all", "c10d::allreduce_"),
     ()),
    ("attention", ("scaled_dot_product",), ()),
    ("expert matmuls", ("grouped_mm", "GroupedMm"), ("moefn/grouped_experts.py",
                                                      "transformers/integrations/moe.py")),
    ("EP dispatch compute (incl. host syncs)",
     ("all_to_all", "alltoall", "wait_tensor", "_local_scalar_dense", "aten::item"),
     ("moefn/realize/ep_dispatch.py", "transformers/distributed/expert_parallel.py")),
)
OTHER_OPS, PYTHON = "other ops (dense matmuls, norms, loss...)", "python and other"
FSDP, DISPATCH, WAITS = CATEGORIES[1][0], CATEGORIES[-1][0], "EP all-to-all waits"
SKEW = "of which rank skew (waits beyond the EP group's shortest)"


def _is_wait(event: FunctionEvent) -> bool:
    """The blocking end of a collective: a functional ``wait_tensor`` or ``Work.wait``."""
    return "wait_tensor" in event.name or event.name.startswith("<built-in method wait of")


def _own_category(event: FunctionEvent) -> str | None:
    for name, ops, files in CATEGORIES:
        if any(op in event.name for op in (*ops, *files)):
            return name
    return None


def _is_python(event: FunctionEvent) -> bool:
    """A Python frame recorded by ``with_stack``: ``file.py(line): function`` or a built-in."""
    return ".py(" in event.name or event.name.startswith("<built-in")


def _inside_wait(event: FunctionEvent) -> bool:
    parent = event.cpu_parent
    while parent is not None and not _is_wait(parent):
        parent = parent.cpu_parent
    return parent is not None


def categorize(events: list[FunctionEvent], wall_s: float,
               steps: int) -> tuple[dict[str, float], list[float]]:
    """Milliseconds per step by category on the thread that ran the steps, and the durations
    (ms) of the EP all-to-all waits in call order."""
    thread = Counter(e.thread for e in events).most_common(1)[0][0]  # the busiest
    mine = [e for e in events if e.thread == thread]
    memo: dict[int, str | None] = {}

    def category(event: FunctionEvent) -> str | None:
        chain: list[FunctionEvent] = []
        node: FunctionEvent | None = event
        while node is not None and id(node) not in memo:
            chain.append(node)
            node = node.cpu_parent
        found = memo[id(node)] if node is not None else None
        for n in reversed(chain):  # outermost first: the innermost match wins, but FSDP's
            own = _own_category(n)  # collectives keep what runs inside them (an all-to-all)
            found = found if found == FSDP or own is None else own
            memo[id(n)] = found
        return found

    forward: dict[int, str | None] = {}
    for e in sorted(mine, key=lambda e: e.time_range.start):
        if e.sequence_nr >= 0 and not e.name.startswith("autograd::"):
            forward.setdefault(e.sequence_nr, category(e))
    for e in mine:  # a backward node is charged like the forward op that recorded it
        if e.name.startswith("autograd::engine::evaluate_function") and _own_category(e) is None:
            memo[id(e)] = forward.get(e.sequence_nr)
    ms: Counter[str] = Counter()
    waits = []
    for e in sorted(mine, key=lambda e: e.time_range.start):
        found = category(e) or (PYTHON if _is_python(e) else OTHER_OPS)
        inside = _inside_wait(e)
        if found == DISPATCH and (inside or _is_wait(e)):  # all of a wait's time is waiting
            found = WAITS
            if not inside:
                waits.append(e.cpu_time_total / 1e3)
        ms[found] += e.self_cpu_time_total
    per_step = {k: v / 1e3 / steps for k, v in ms.items()}
    per_step[PYTHON] = wall_s * 1e3 / steps - sum(v for k, v in per_step.items() if k != PYTHON)
    return {name: round(per_step.get(name, 0.0), 1)
            for name in [c[0] for c in CATEGORIES] + [WAITS, OTHER_OPS, PYTHON]}, waits


def rank_skew(waits: dict[int, list[float]], groups: dict[int, list[int]], rank: int,
              steps: int) -> float | None:
    """Milliseconds per step ``rank`` waited beyond its EP group's shortest wait at the same
    all-to-all (the k-th wait of every rank of a group is the same call), or None when the
    group's ranks recorded different numbers of waits.

    >>> rank_skew({0: [3.0, 1.0], 1: [1.0, 2.0]}, {0: [0, 1], 1: [0, 1]}, 0, 1)
    2.0
    """
    mine = waits[rank]
    if any(len(waits[g]) != len(mine) for g in groups[rank]):
        return None
    return round(sum(w - min(waits[g][k] for g in groups[rank])
                     for k, w in enumerate(mine)) / steps, 1)


def _ep_ranks(model: torch.nn.Module, system: str) -> list[int]:
    """The ranks of this rank's EP group in ``model`` of ``system``."""
    if system == "transformers":
        group = model._mesh_manager.get_mesh("ep").get_group()  # type: ignore[union-attr, operator]
    else:
        group = next(m.dispatcher.group for m in model.modules()  # type: ignore[union-attr]
                     if hasattr(m, "dispatcher"))
    return dist.get_process_group_ranks(group)


def _profile_rank(rank: int, world: int, path: str,
                  system: str) -> tuple[dict[str, float], list[float], list[int]]:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    model = peer._load(path, system, EP)
    batch = peer._batch()
    mine = local_batch(batch, MeshSpec(dp_shard=peer.FSDP), rank)
    optimizer = peer.OPTIMIZERS["sgd"](model.parameters())
    scale = float(peer.FSDP) if system == "transformers" else 1.0

    def step() -> None:
        optimizer.zero_grad()
        logits = model(input_ids=mine.input_ids, position_ids=mine.position_ids,
                       use_cache=False).logits
        (causal_lm_loss((logits,), mine.labels, batch.num_valid) * scale).backward()
        optimizer.step()

    for _ in range(STEPS):
        step()
    with profile(activities=[ProfilerActivity.CPU], with_stack=True) as prof:
        start = time.perf_counter()
        for _ in range(STEPS):
            step()
        wall = time.perf_counter() - start
    return (*categorize(list(prof.events()), wall, STEPS), _ep_ranks(model, system))


def profile_peer() -> list[dict[str, Any]]:
    """One row per (category, rank): milliseconds per step of each system, the rank skew
    (part of the waits) after the waits."""
    with tempfile.TemporaryDirectory() as root:
        path = os.path.join(root, "qwen3-moe")
        run_local(1, peer._save, path)
        runs = {s: run_local(peer.NPROC, _profile_rank, path, s) for s in SYSTEMS}
    ms = {s: {r: {**by[0], SKEW: rank_skew({i: b[1] for i, b in enumerate(runs[s])},
                                           {i: b[2] for i, b in enumerate(runs[s])}, r, STEPS)}
              for r, by in enumerate(runs[s])} for s in SYSTEMS}
    names = list(runs[SYSTEMS[0]][0][0])
    names.insert(names.index(WAITS) + 1, SKEW)
    return [{"category": category, "rank": rank, **{f"{s}_ms": ms[s][rank][category]
                                                    for s in SYSTEMS}}
            for rank in RANKS for category in names]
