"""``moefn calibrate``: measure this machine with microbenchmarks only and write a hardware profile
that ``moefn plan --search --hardware FILE`` reads (`moefn.analyse.steptime`).

Every figure is measured with ``nproc`` local CPU ranks running at once on gloo (the backend of
moefn's local ranks; NCCL on GPUs is not measured yet), as training would run them: matmul
throughput per dtype (a square ``torch.mm``), the per-op overhead (a one-element add), and for
each collective its latency per call (one element) and bandwidth (a large payload: the bytes one
rank sends, counted as `moefn.analyse.comm` counts them, over the extra time). One machine has
one kind of link: the inter-node figures are the intra-node ones, and the profile says so.

Compute figures are what one rank gets while every local rank computes too (`_busy`: each rank
calls the kernel back to back for a while, all at once): ranks that share cores (4 ranks on 2
cores) each get a share. Timing one call after a barrier overstates it (the ranks drift apart
and each runs alone part of the time: 512² fp32 matmul measured 64 GFLOP/s per rank that way,
38 with every rank busy, 74 alone, on this 2-core machine).
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

from moefn.launch import run_local

SMALL, LARGE = 1, 1 << 20  # elements per rank (fp32)


def _seconds(fn: Callable[[], object], repeat: int) -> float:
    """Median seconds of ``fn`` (after one warm-up), the ranks in step before each run."""
    fn()
    times = []
    for _ in range(repeat):
        dist.barrier()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
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


def _busy(fn: Callable[[], object], seconds: float) -> float:
    """Seconds per call of ``fn`` while every rank calls its own back to back for ``seconds``
    (after a warm-up and a barrier): what a rank gets while all local ranks compute."""
    fn()
    dist.barrier()
    calls, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds or not calls:
        fn()
        calls += 1
    return elapsed / calls


def _measure_rank(rank: int, world: int, matmul_size: int, repeat: int,
                  busy_s: float) -> dict[str, Any]:
    flops = {}
    for dtype in (torch.float32, torch.bfloat16):
        a = torch.randn(matmul_size, matmul_size, dtype=dtype)
        flops[str(dtype).removeprefix("torch.")] = (
            2 * matmul_size**3 / _busy(partial(torch.mm, a, a), busy_s))
    x = torch.ones(1)
    ops = 1000
    overhead = _busy(lambda: [torch.add(x, x) for _ in range(ops)], busy_s) / ops
    links = {}
    for op in ("all_gather", "reduce_scatter", "all_reduce", "all_to_all", "send", "recv"):
        small, _ = _collective("send" if op == "recv" else op, SMALL, world, rank)
        large, moved = _collective("send" if op == "recv" else op, LARGE, world, rank)
        latency = _seconds(small, repeat)
        extra = max(_seconds(large, repeat) - latency, 1e-9)
        links[op] = {"latency_s": latency, "bandwidth_bytes_per_s": moved / extra}
    return {"flops": flops, "overhead": overhead, "links": links}


def calibrate(nproc: int = 4, matmul_size: int = 512, repeat: int = 7,
              busy_s: float = 1.0) -> dict[str, Any]:
    """A ``moefn.hardware`` profile of this machine, from ``nproc`` local ranks (the slowest
    rank's figure for each measurement; compute figures over ``busy_s`` seconds of every rank
    busy, collectives the median of ``repeat``)."""
    ranks = run_local(nproc, _measure_rank, matmul_size, repeat, busy_s)
    flops = {k: min(r["flops"][k] for r in ranks) for k in ranks[0]["flops"]}
    links = {op: {"latency_s": max(r["links"][op]["latency_s"] for r in ranks),
                  "bandwidth_bytes_per_s": min(r["links"][op]["bandwidth_bytes_per_s"]
                                               for r in ranks)}
             for op in ranks[0]["links"]}
    backend = "gloo"
    return {"format": "moefn.hardware", "version": 1,
            "name": f"this machine ({nproc} local {backend} ranks)", "calibrated": True,
            "source": f"moefn calibrate: {nproc} ranks at once, {torch.get_num_threads()} "
                      f"threads in the caller, matmul {matmul_size}² and per-op overhead with "
                      f"every rank busy for {busy_s} s, collectives the median of {repeat}",
            "notes": "one machine: inter_node repeats intra_node",
            "matmul_flops_per_s": flops,
            "op_overhead_s": max(r["overhead"] for r in ranks),
            "intra_node": links, "inter_node": links}


def main(path: str, nproc: int) -> dict[str, Any]:
    profile = calibrate(nproc)
    with open(path, "w") as f:
        json.dump(profile, f, indent=1)
    return profile
