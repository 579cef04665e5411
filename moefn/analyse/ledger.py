"""Count the collectives a real step runs, in the terms `moefn.analyse.estimate` predicts (effectful).

Every c10d and functional collective that passes torch's dispatcher — forward, backward and
recompute, from FSDP, DTensor or moefn's own dispatchers — is recorded under its kind and its
process group's ranks, with the logical payload this rank sends and receives (FSDP's
reduce-scatter on gloo, `moefn.realize.gloo_reduce_scatter`, as the reduce-scatter it is):

- all-gather of an ``s``-byte shard over ``n`` ranks: ``s·(n−1)`` each way;
- reduce-scatter to an ``s``-byte shard: ``s·(n−1)`` each way (each peer's part);
- all-to-all: the input less the rows kept for itself is sent, the output less those received;
- all-reduce of ``b`` bytes: ``2·b·(n−1)//n`` each way (a reduce-scatter, then an all-gather);
- broadcast of ``b`` bytes: ``b·(n−1)`` sent by the source, ``b`` received by the others;
- point-to-point send / receive of ``b`` bytes: ``b`` sent (kind "send") / received ("recv").

Padding (FSDP pads each shard to equal size) is part of the payload, as it is on the wire.

>>> import torch
>>> import torch.distributed as dist
>>> from moefn.launch import fake_world
>>> with fake_world(world_size=4), CommLedger() as ledger:
...     dist.all_reduce(torch.ones(256))  # 1 KiB
>>> ledger.totals()
{('all_reduce', (0, 1, 2, 3)): Traffic(calls=1, sent=1536, received=1536)}
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d
from attrs import frozen
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

Key = tuple[str, tuple[int, ...]]  # (kind, the group's global ranks)


@frozen
class Traffic:
    calls: int = 0
    sent: int = 0
    received: int = 0

    def __add__(self, other: Traffic) -> Traffic:
        return Traffic(self.calls + other.calls, self.sent + other.sent,
                       self.received + other.received)


def _nbytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


def _total(tensors: Sequence[Tensor]) -> int:
    return sum(_nbytes(t) for t in tensors)


def _group(arg: Any) -> dist.ProcessGroup:
    if isinstance(arg, str):
        group_: dist.ProcessGroup = c10d._resolve_process_group(  # type: ignore[attr-defined]
            c10d.GroupName(arg))
        return group_
    group: dist.ProcessGroup = dist.ProcessGroup.unbox(arg)
    return group


def _all_to_all(out: Tensor, inp: Tensor, out_splits: Sequence[int], in_splits: Sequence[int],
                group: dist.ProcessGroup) -> Traffic:
    me, n = group.rank(), group.size()

    def kept(t: Tensor, splits: Sequence[int]) -> int:
        rows = splits[me] if splits else t.shape[0] // n
        return rows * (_nbytes(t) // max(t.shape[0], 1))

    return Traffic(1, _nbytes(inp) - kept(inp, in_splits), _nbytes(out) - kept(out, out_splits))


def _traffic(name: str, args: Sequence[Any], out: Any) -> tuple[str, dist.ProcessGroup, Traffic]:
    """The kind, the group and this rank's payload of one collective op call."""
    if name in ("_allgather_base_", "all_gather_into_tensor"):
        inp, group = (args[1], args[2]) if name.endswith("_") else (args[0], args[2])
        n = _group(group).size()
        return "all_gather", _group(group), Traffic(1, _nbytes(inp) * (n - 1), _nbytes(inp) * (n - 1))
    if name in ("allgather_into_tensor_coalesced_", "all_gather_into_tensor_coalesced"):
        inputs, group = (args[1], args[2]) if name.endswith("_") else (args[0], args[2])
        n = _group(group).size()
        return "all_gather", _group(group), Traffic(1, _total(inputs) * (n - 1),
                                                    _total(inputs) * (n - 1))
    if name in ("_reduce_scatter_base_", "reduce_scatter_tensor",
                "reduce_scatter_tensor_coalesced_", "reduce_scatter_tensor_coalesced",
                "reduce_scatter_by_all_to_all"):
        c10d = name.endswith("_") or name == "reduce_scatter_by_all_to_all"  # (out, in, group)
        group = _group(args[2] if c10d else args[3])
        outputs = args[0] if c10d else out
        shard = _total(outputs) if isinstance(outputs, (list, tuple)) else _nbytes(outputs)
        return "reduce_scatter", group, Traffic(1, shard * (group.size() - 1),
                                                shard * (group.size() - 1))
    if name in ("allreduce_", "all_reduce", "all_reduce_", "allreduce_coalesced_",
                "all_reduce_coalesced", "all_reduce_coalesced_"):
        group = _group(args[1] if name in ("allreduce_", "allreduce_coalesced_") else args[2])
        tensors = args[0] if isinstance(args[0], (list, tuple)) else [args[0]]
        n = group.size()
        moved = 2 * _total(tensors) * (n - 1) // n
        return "all_reduce", group, Traffic(1, moved, moved)
    if name == "alltoall_base_":
        group = _group(args[2])
        return "all_to_all", group, _all_to_all(args[0], args[1], args[3], args[4], group)
    if name == "all_to_all_single":
        group = _group(args[3])
        return "all_to_all", group, _all_to_all(out, args[0], args[1], args[2], group)
    if name in ("broadcast_", "broadcast"):
        c10d = name.endswith("_")
        group = _group(args[1] if c10d else args[2])
        tensors = args[0] if isinstance(args[0], (list, tuple)) else [args[0]]
        source = args[2] if c10d else args[1]
        size, n = _total(tensors), group.size()
        mine = group.rank() == source
        return "broadcast", group, Traffic(1, size * (n - 1) if mine else 0, 0 if mine else size)
    if name in ("send", "recv_"):
        group, size = _group(args[1]), _total(args[0])
        if name == "send":
            return "send", group, Traffic(1, size, 0)
        return "recv", group, Traffic(1, 0, size)
    raise NotImplementedError(f"CommLedger does not count {name}")


_NAMESPACES = ("c10d", "_c10d_functional", "moefn")
_NOT_COLLECTIVES = ("wait_tensor", "_wrap_tensor_autograd", "barrier", "monitored_barrier")


class CommLedger(TorchDispatchMode):  # type: ignore[no-untyped-call]  # untyped in torch
    """``with CommLedger() as ledger: step()``; then ``ledger.totals()`` by (kind, group ranks).

    A collective the ledger cannot size raises NotImplementedError (no silent undercount).
    """

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.records: list[tuple[Key, Traffic]] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if func.namespace in _NAMESPACES and name not in _NOT_COLLECTIVES:
            kind, group, traffic = _traffic(name, args, out)
            ranks = tuple(dist.get_process_group_ranks(group))
            self.records.append(((kind, ranks), traffic))
        return out

    def totals(self) -> dict[Key, Traffic]:
        """Calls and bytes summed per (kind, group ranks)."""
        out: dict[Key, Traffic] = {}
        for key, traffic in self.records:
            out[key] = out.get(key, Traffic()) + traffic
        return out

    def by_kind(self) -> dict[str, Traffic]:
        """Calls and bytes summed per kind over all groups (e.g. for a benchmark table)."""
        out: dict[str, Traffic] = {}
        for (kind, _), traffic in self.records:
            out[kind] = out.get(kind, Traffic()) + traffic
        return out
