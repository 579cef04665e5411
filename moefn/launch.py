"""Start local ranks (fork + gloo) or join a torchrun launch (NCCL on CUDA, gloo otherwise).

>>> with one_rank_group() as group:  # a real gloo group of this process alone
...     group.size()
1
>>> with fake_world(world_size=4, rank=3):  # torch's fake group: no peers, no traffic
...     dist.get_rank(), dist.get_world_size()
(3, 4)
"""

from __future__ import annotations

import multiprocessing as mp
import os
import tempfile
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from torch._C._distributed_c10d import HashStore


def forget_dtensor_caches() -> None:
    """Empty DTensor's sharding caches once their process groups are gone.

    torch caches sharding results by mesh *value*: after a group is destroyed, a new mesh of the
    same shape (a real world after a fake one, or a forked child of this process) would get the
    cached mesh back, whose group no longer resolves ("Could not resolve the process group")."""
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._redistribute import clear_redistribute_planner_cache

    torch._C._clear_DTensor_sharding_propagator_cache()
    propagator = DTensor._op_dispatcher.sharding_propagator
    propagator.propagate_op_sharding.cache_clear()  # type: ignore[no-untyped-call]
    clear_redistribute_planner_cache()


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


@contextmanager
def one_rank_group(backend: str = "gloo") -> Iterator[dist.ProcessGroup]:
    """A default process group of this process alone (examples, debugging); destroyed at exit."""
    dist.init_process_group(backend, store=HashStore(), rank=0, world_size=1)
    group = dist.group.WORLD
    assert group is not None  # set by init_process_group
    try:
        yield group
    finally:
        dist.destroy_process_group()
        forget_dtensor_caches()


@contextmanager
def fake_world(world_size: int, rank: int = 0) -> Iterator[None]:
    """torch's fake process group: this process is ``rank`` of ``world_size``, collectives do
    nothing (realize a big layout without the ranks); destroyed at exit."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()
        forget_dtensor_caches()


def init_from_env() -> torch.device:
    """Join a torchrun group; returns this rank's device (cuda:LOCAL_RANK when available)."""
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
        return device
    dist.init_process_group("gloo")
    return torch.device("cpu")


def _rank_main(rank: int, world: int, store_path: str, fn: Callable[..., Any],
               args: tuple[Any, ...], queue: Any) -> None:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    forget_dtensor_caches()  # the parent's, inherited through fork
    try:
        dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank,
                                world_size=world)
        result = fn(rank, world, *args)
        queue.put((rank, "ok", result))
    except BaseException:  # noqa: BLE001 - every failure goes back to the parent
        queue.put((rank, "err", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_local(nproc: int, fn: Callable[..., Any], *args: Any, timeout: float = 1800) -> list[Any]:
    """Fork ``nproc`` CPU ranks running ``fn(rank, world, *args)``; per-rank results in order."""
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    store = tempfile.mktemp(prefix="moefn-")
    procs = [ctx.Process(target=_rank_main, args=(r, nproc, store, fn, args, queue))
             for r in range(nproc)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    errors: list[str] = []
    try:
        for _ in range(nproc):
            rank, status, value = queue.get(timeout=timeout)
            if status == "ok":
                results[rank] = value
            else:
                errors.append(f"rank {rank}:\n{value}")
                break
    finally:
        for p in procs:
            p.join(timeout=5 if errors else None)
            if p.is_alive():
                p.kill()
    if errors:
        raise RuntimeError("a rank failed:\n" + "\n".join(errors))
    return [results[r] for r in range(nproc)]
