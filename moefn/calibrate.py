"""``moefn calibrate``: measure this machine with microbenchmarks only and write a hardware profile
that ``moefn plan --search --hardware FILE`` reads (`moefn.analyse.steptime`).

Every figure is measured with ``nproc`` local CPU ranks running at once on gloo (the backend of
moefn's local ranks; NCCL on GPUs is not measured yet), as training would run them: matmul
throughput per dtype (a square ``torch.mm``), the cost per op of eager training code and what
full and selective checkpointing add to it (`moefn.calibrate_ops`), the bytes per second of an
activation-sized add (`ACTIVATION` elements: what a non-matmul op moves), how much of the
shorter of compute and a collective the machine hides when both run at once (`_overlap`), and
for each collective its latency per call (one element, each call after a `BETWEEN`² matmul,
less the matmul's time: ranks reach a collective from compute, as in training) and bandwidth
(a large payload: the bytes one rank sends, counted as `moefn.analyse.comm` counts them, over
the extra time), each per call of many calls back to back with every rank calling, the median
of several such runs.
One machine has one kind of link: the inter-node figures are the intra-node ones, and the
profile says so.

Compute figures are what one rank gets while every local rank computes too
(`moefn.calibrate_ops.busy`: each rank calls the kernel back to back for a while, all at once):
ranks that share cores (4 ranks on 2 cores) each get a share. Timing one call after a barrier
overstates it (the ranks drift apart and each runs alone part of the time: 512² fp32 matmul
measured 64 GFLOP/s per rank that way, 38 with every rank busy, 74 alone, on this 2-core
machine).
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
import torch.distributed as dist

from moefn.calibrate_ops import busy, op_costs
from moefn.launch import run_local
from moefn.plan.arguments import finite_number, int_at_least

SMALL, LARGE = 1, 1 << 20  # elements per rank (fp32)
ACTIVATION = 1 << 18  # elements of the add whose bytes per second non-matmul ops get (1 MiB)
CALLS = 10  # back to back per timed run
BETWEEN = 256  # a matmul of this size between collective calls when timing their latency


def _seconds(fn: Callable[[], object], repeat: int, calls: int = CALLS) -> float:
    """Seconds per call of ``fn``: ``calls`` back to back on every rank at once (after a
    warm-up and a barrier), the median of ``repeat`` such runs."""
    fn()
    times = []
    for _ in range(repeat):
        dist.barrier()
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - start) / calls)
    return statistics.median(times)


def _collective(op: str, elements: int, n: int, rank: int) -> tuple[Callable[[], object], int]:
    """The call and the bytes it moves per rank as `moefn.analyse.comm` counts them."""
    shard = torch.ones(elements)
    size = shard.numel() * 4
    if op == "all_gather":
        out = torch.empty(elements * n)
        return lambda: dist.all_gather_into_tensor(out, shard), size * (n - 1)
    if op == "reduce_scatter":
        full = torch.ones(elements * n)
        return lambda: dist.reduce_scatter_tensor(shard, full), size * (n - 1)
    if op == "all_reduce":
        return lambda: dist.all_reduce(shard), 2 * size * (n - 1) // n
    if op == "all_to_all":
        full, out = torch.ones(elements * n), torch.empty(elements * n)
        return lambda: dist.all_to_all_single(out, full), size * (n - 1)
    recv = torch.empty(elements)

    def ring() -> None:  # send/recv: every rank to the next, from the previous
        reqs = [dist.isend(shard, (rank + 1) % n), dist.irecv(recv, (rank - 1) % n)]
        for r in reqs:
            assert r is not None  # point-to-point calls return their Work
            r.wait()
    return ring, size


def _overlap(repeat: int, matmul_size: int) -> float:
    """How much of the shorter of compute (matmuls) and a collective (all-gathers of `LARGE`
    elements, `torch.distributed`'s async calls) is hidden when both run at once: (alone +
    alone − together) / the shorter, between 0 and 1; the median of ``3 · repeat`` rounds,
    each timing the three back to back (so that a change in load hits all three)."""
    world = dist.get_world_size()
    shard, out = torch.ones(LARGE), torch.empty(LARGE * world)
    a = torch.randn(matmul_size, matmul_size)

    def gathers() -> list[Any]:
        return [dist.all_gather_into_tensor(out, shard, async_op=True) for _ in range(4)]

    def comm() -> None:
        for w in gathers():
            w.wait()

    n = max(round(_seconds(comm, repeat, calls=1) / _seconds(partial(torch.mm, a, a), repeat)),
            1)

    def compute() -> None:
        for _ in range(n):
            torch.mm(a, a)

    def both() -> None:
        works = gathers()
        compute()
        for w in works:
            w.wait()

    rounds = []
    for _ in range(3 * repeat):
        alone, apart, together = (_seconds(fn, 1, calls=1) for fn in (compute, comm, both))
        rounds.append((alone + apart - together) / min(alone, apart))
    return min(max(statistics.median(rounds), 0.0), 1.0)


def _measure_rank(rank: int, world: int, matmul_size: int, repeat: int,
                  busy_s: float) -> dict[str, Any]:
    flops = {}
    for dtype in (torch.float32, torch.bfloat16):
        a = torch.randn(matmul_size, matmul_size, dtype=dtype)
        flops[str(dtype).removeprefix("torch.")] = (
            2 * matmul_size**3 / busy(partial(torch.mm, a, a), busy_s))
    x, y = torch.ones(1), torch.ones(ACTIVATION)
    bare = busy(partial(torch.add, x, x), busy_s)
    per_add = busy(partial(torch.add, y, y), busy_s)
    op_bytes = 3 * y.numel() * y.element_size() / max(per_add - bare, 1e-9)
    costs = {**op_costs(busy_s), "op_bytes_per_s": op_bytes,
             "overlap": _overlap(repeat, matmul_size)}
    links = {}
    between = partial(torch.mm, *(torch.randn(BETWEEN, BETWEEN),) * 2)
    computing = _seconds(between, repeat)
    for op in ("all_gather", "reduce_scatter", "all_reduce", "all_to_all", "send", "recv"):
        small, _ = _collective("send" if op == "recv" else op, SMALL, world, rank)
        large, moved = _collective("send" if op == "recv" else op, LARGE, world, rank)
        latency = max(_seconds(partial(_after, between, small), repeat) - computing, 0.0)
        extra = max(_seconds(large, repeat) - _seconds(small, repeat), 1e-9)
        links[op] = {"latency_s": latency, "bandwidth_bytes_per_s": moved / extra}
    return {"flops": flops, "links": links, **costs}


def _after(first: Callable[[], object], then: Callable[[], object]) -> None:
    """``then()`` reached from ``first()``, as a collective is reached from compute."""
    first()
    then()


def calibrate(nproc: int = 4, matmul_size: int = 512, repeat: int = 7,
              busy_s: float = 1.0) -> dict[str, Any]:
    """A ``moefn.hardware`` profile of this machine, from ``nproc`` local ranks (the slowest
    rank's figure for each measurement, the median rank's overlap; compute figures over
    ``busy_s`` seconds of every rank busy, collectives the median of ``repeat`` runs of
    `CALLS` calls)."""
    int_at_least(nproc, "nproc", 2)  # a collective needs a peer
    int_at_least(matmul_size, "matmul_size")
    int_at_least(repeat, "repeat")
    finite_number(busy_s, "busy_s")
    ranks = run_local(nproc, _measure_rank, matmul_size, repeat, busy_s)
    flops = {k: min(r["flops"][k] for r in ranks) for k in ranks[0]["flops"]}
    links = {op: {"latency_s": max(r["links"][op]["latency_s"] for r in ranks),
                  "bandwidth_bytes_per_s": min(r["links"][op]["bandwidth_bytes_per_s"]
                                               for r in ranks)}
             for op in ranks[0]["links"]}
    backend = "gloo"
    return {"format": "moefn.hardware", "version": 2,
            "name": f"this machine ({nproc} local {backend} ranks)", "calibrated": True,
            "source": f"moefn calibrate: {nproc} ranks at once, {torch.get_num_threads()} "
                      f"threads in the caller, matmul {matmul_size}² and per-op overhead with "
                      f"every rank busy for {busy_s} s, collectives the median of {repeat} "
                      f"runs of {CALLS} calls back to back",
            "notes": "one machine: inter_node repeats intra_node",
            "matmul_flops_per_s": flops,
            **{k: max(r[k] for r in ranks)
               for k in ("op_overhead_s", "checkpoint_op_s", "selective_op_s")},
            "op_bytes_per_s": min(r["op_bytes_per_s"] for r in ranks),
            "overlap": statistics.median(r["overlap"] for r in ranks),
            "intra_node": links, "inter_node": links}


def main(path: str, nproc: int) -> dict[str, Any]:
    profile = calibrate(nproc)
    with open(path, "w") as f:
        json.dump(profile, f, indent=1)
    return profile
