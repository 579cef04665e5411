"""A pool of forked gloo ranks that runs many test cases inside one process group.

``RankPool(2).run(some_module_level_function, arg)`` returns ``[result_rank0, result_rank1]``.

Workers are forked from the pytest process (torch already imported), so a case is any
module-level function ``fn(rank, world_size, *args)``; results must be picklable. A failing
or hanging case tears the pool down (the next `run` starts a fresh one) and raises here with
every rank's traceback; a case that outlives the pool's deadline, or a test interrupted by
pytest-timeout, kills the pool too, so the next case never meets ranks stuck in the last one.

Threads: each gloo group holds 3, and torch 2.13 keeps some of a destroyed group's threads once
it ran collectives. A worker left with more than RECYCLE_THREADS after a case is replaced, and a
case that ever holds more than MAX_THREADS fails: so a case realizes one layout (a test loops
over layouts with one `run` each).
"""

from __future__ import annotations

import gc
import multiprocessing as mp
import os
import tempfile
import time
import traceback
from collections.abc import Callable
from multiprocessing.connection import Connection, wait
from typing import Any

import torch
import torch.distributed as dist

from moefn.launch import forget_dtensor_caches

RECYCLE_THREADS = 40  # a worker left with more after a case is replaced (a gloo group holds 3)
MAX_THREADS = 100  # a case that ever holds more fails: realize one layout per pool call
_PEAK = [0]  # most threads this worker held at a release_groups() during the current case


def _threads(pid: int | str = "self") -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


class RankFailure(RuntimeError):
    pass


def release_groups() -> None:
    """Destroy every process group a case created (each realize builds several for its device
    meshes). Each gloo group keeps its own polling threads: left alive, hundreds of them
    accumulate over a test session and starve the machine. A case that realizes many models
    calls this between them (a group lives until the last reference to it is gone: drop
    exceptions' tracebacks, whose frames hold the meshes, before calling)."""
    _PEAK[0] = max(_PEAK[0], _threads())
    dist.barrier()  # every rank is done with the case's groups
    world = dist.group.WORLD
    for group in list(dist.distributed_c10d._world.pg_map):
        if group is not world:
            dist.destroy_process_group(group)
    forget_dtensor_caches()  # else the next case's equal-valued mesh gets these dead groups
    gc.collect()  # a realized model's hooks form reference cycles that keep its groups alive


def _worker(rank: int, world_size: int, store_path: str, conn: Connection) -> None:
    torch.set_num_threads(1)
    forget_dtensor_caches()  # inherited from the pytest process: its fake worlds' meshes
    os.environ["MOEFN_TEST_RANK"] = str(rank)
    store = dist.FileStore(store_path, world_size)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size)
    gc.freeze()  # what exists now (imports, the world group) stays: a case's gc.collect() skips it
    while True:
        task = conn.recv()
        if task is None:
            break
        fn, args = task
        try:
            _PEAK[0] = 0
            result = fn(rank, world_size, *args)
            release_groups()
            if _PEAK[0] > MAX_THREADS:
                raise RankFailure(f"the case held {_PEAK[0]} threads (at most {MAX_THREADS}): "
                                  "call release_groups() between its realizes")
            conn.send(("ok", result))
        except BaseException:  # noqa: BLE001 - report everything to the parent
            conn.send(("err", traceback.format_exc()))
    dist.destroy_process_group()
    conn.close()


class RankPool:
    def __init__(self, world_size: int, timeout: float = 240.0) -> None:
        self.world_size = world_size
        self.timeout = timeout  # below pytest-timeout's, so the pool names a hung case first
        self._procs: list[Any] = []
        self._conns: list[Connection] = []

    @property
    def pids(self) -> list[int]:
        return [proc.pid for proc in self._procs]

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
        try:
            answers = self._answers()
        except BaseException:  # interrupted (pytest-timeout, ^C): the ranks may be mid-case
            self.close(force=True)
            raise
        errors = [f"rank {r}:\n{value}" for r, (status, value) in sorted(answers.items())
                  if status == "err"]
        errors += [f"rank {r}: no answer within {self.timeout:.0f} s (hang?)"
                   for r in range(self.world_size) if r not in answers]
        if errors:
            self.close(force=True)
            case = ", ".join(repr(a) for a in args)[:2000]
            test = os.environ.get("PYTEST_CURRENT_TEST", "")
            raise RankFailure(f"{test}: {fn.__name__}({case}) failed on {self.world_size} ranks:\n"
                              + "\n".join(errors))
        if max(_threads(pid) for pid in self.pids) > RECYCLE_THREADS:
            self.close()  # groups torch still holds after release_groups: start afresh next run
        return [answers[r][1] for r in range(self.world_size)]

    def _answers(self) -> dict[int, tuple[str, Any]]:
        answers: dict[int, tuple[str, Any]] = {}
        deadline = time.monotonic() + self.timeout  # one deadline for all ranks
        while len(answers) < self.world_size and time.monotonic() < deadline:
            waiting = [c for r, c in enumerate(self._conns) if r not in answers]
            ready = wait(waiting, timeout=max(0.0, deadline - time.monotonic()))
            for rank, conn in enumerate(self._conns):
                if conn in ready:
                    answers[rank] = conn.recv()
            if any(status == "err" for status, _ in answers.values()):  # peers may now hang
                deadline = min(deadline, time.monotonic() + 5.0)
        return answers

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
