"""A pool of forked gloo ranks that runs many test cases inside one process group.

>>> pool = RankPool(2)
>>> pool.run(some_module_level_function, arg)   # -> [result_rank0, result_rank1]

Workers are forked from the pytest process (torch already imported), so a case is any
module-level function ``fn(rank, world_size, *args)``; results must be picklable. A failing
or hanging case tears the pool down (the next `run` starts a fresh one) and raises here with
every rank's traceback.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import tempfile
import time
import traceback
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

import torch
import torch.distributed as dist


class RankFailure(RuntimeError):
    pass


def _worker(rank: int, world_size: int, store_path: str, conn: Connection) -> None:
    torch.set_num_threads(1)
    os.environ["MOEFN_TEST_RANK"] = str(rank)
    store = dist.FileStore(store_path, world_size)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size)
    while True:
        task = conn.recv()
        if task is None:
            break
        fn, args = task
        try:
            conn.send(("ok", fn(rank, world_size, *args)))
        except BaseException:  # noqa: BLE001 - report everything to the parent
            conn.send(("err", traceback.format_exc()))
    dist.destroy_process_group()
    conn.close()


class RankPool:
    def __init__(self, world_size: int, timeout: float = 120.0) -> None:
        self.world_size = world_size
        self.timeout = timeout
        self._procs: list[Any] = []
        self._conns: list[Connection] = []

    def _start(self) -> None:
        ctx = mp.get_context("fork")
        store_path = tempfile.mktemp(prefix="moefn-store-")
        for rank in range(self.world_size):
            parent, child = ctx.Pipe()
            proc = ctx.Process(
                target=_worker, args=(rank, self.world_size, store_path, child), daemon=True
            )
            proc.start()
            self._procs.append(proc)
            self._conns.append(parent)

    def run(self, fn: Callable[..., Any], *args: Any) -> list[Any]:
        if not self._procs:
            self._start()
        for conn in self._conns:
            conn.send((fn, args))
        results: list[Any] = []
        errors: list[str] = []
        deadline = time.monotonic() + self.timeout  # one deadline for all ranks
        for rank, conn in enumerate(self._conns):
            if not conn.poll(max(0.0, deadline - time.monotonic())):
                errors.append(f"rank {rank}: no answer within {self.timeout}s (hang?)")
                continue
            status, value = conn.recv()
            if status == "ok":
                results.append(value)
            else:
                errors.append(f"rank {rank}:\n{value}")
        if errors:
            self.close(force=True)
            raise RankFailure(f"{fn.__name__} failed:\n" + "\n".join(errors))
        return results

    def close(self, force: bool = False) -> None:
        for proc, conn in zip(self._procs, self._conns, strict=True):
            if force:
                proc.kill()
            else:
                conn.send(None)
        for proc in self._procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
        self._procs, self._conns = [], []
