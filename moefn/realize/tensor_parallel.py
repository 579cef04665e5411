"""Tensor parallelism over ``tp`` with sequence parallelism between the parallel modules.

The residual stream between modules is each tp rank's own chunk of the sequence (a plain
tensor ``[B, S/tp, H]``): norms, routers, shared experts and experts run on distinct tokens, and
their gradients are summed over tp by the plan's gradient rule. An attention or dense MLP
(``gather``) all-gathers the sequence on the way in; inside it, column-wise linears run this
rank's shard of the output features and row-wise linears reduce-scatter their partial sums back
to sequence chunks; a replicated K/V projection computes only the K/V heads this rank's query
heads read. Every gradient entering a gathered module's input is a partial sum over tp
(each rank sees its own heads), so the gather's backward is a reduce-scatter. Collectives are
DTensor redistributions (``torch.distributed.tensor``); parameters are DTensors sharded on tp,
computed with their local shards.
"""

from __future__ import annotations

from collections.abc import Callable
from types import MethodType
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard

from moefn.adapters.adapter import Adapter
from moefn.plan.errors import RealizeError
from moefn.plan.records import TensorParallel
from moefn.plan.tp_heads import kv_heads_read


def gather_sequence(x: Tensor, mesh: DeviceMesh) -> Tensor:
    """``[B, S/tp, ...]`` chunks → the whole ``[B, S, ...]``; backward sums the ranks'
    partial gradients and keeps this rank's chunk (reduce-scatter)."""
    whole = DTensor.from_local(x, mesh, [Shard(1)], run_check=False).redistribute(
        mesh, [Replicate()])
    return whole.to_local(grad_placements=[Partial()])


def scatter_partial(y: Tensor, mesh: DeviceMesh) -> Tensor:
    """Partial sums ``[B, S, ...]`` → this rank's chunk ``[B, S/tp, ...]`` of their total
    (reduce-scatter); backward all-gathers."""
    if y.shape[1] % mesh.size():
        raise RealizeError.single("input_ids", "sequence length not divisible by tp",
                                  f"{y.shape[1]} tokens per rank, tp={mesh.size()}",
                                  f"use a local sequence length that is a multiple of {mesh.size()}")
    part = DTensor.from_local(y, mesh, [Partial()], run_check=False)
    return part.redistribute(mesh, [Shard(1)]).to_local()


def _local(t: Tensor) -> Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _colwise(self: nn.Linear, x: Tensor) -> Tensor:
    bias = None if self.bias is None else _local(self.bias)
    return F.linear(x, _local(self.weight), bias)


def _kv_heads(self: nn.Linear, x: Tensor) -> Tensor:
    """A replicated K/V projection: the rows of the K/V heads this rank's query heads read
    (``_ROWS``); the other rows get no gradient here, and the plan sums the rows' over tp."""
    rows: Tensor = getattr(self, _ROWS)
    if rows.device != x.device:  # once: not a host-to-device copy every forward
        rows = rows.to(x.device)
        setattr(self, _ROWS, rows)
    bias = None if self.bias is None else self.bias.index_select(0, rows)
    return F.linear(x, self.weight.index_select(0, rows), bias)


def _rowwise(self: nn.Linear, x: Tensor) -> Tensor:
    return scatter_partial(F.linear(x, _local(self.weight)), getattr(self, _MESH))


def _vocab_embed(self: nn.Embedding, input_ids: Tensor) -> Tensor:
    weight = _local(self.weight)
    mesh: DeviceMesh = getattr(self, _MESH)
    first = mesh.get_local_rank() * weight.shape[0]
    outside = (input_ids < first) | (input_ids >= first + weight.shape[0])
    rows = F.embedding((input_ids - first).masked_fill(outside, 0), weight)
    return scatter_partial(rows.masked_fill(outside[..., None], 0.0), mesh)


def _vocab_head(self: nn.Linear, x: Tensor) -> Tensor:
    """Logits of this rank's vocabulary shard as a DTensor sharded on the last dim (the loss
    runs under ``loss_parallel``)."""
    mesh: DeviceMesh = getattr(self, _MESH)
    logits = F.linear(gather_sequence(x, mesh), _local(self.weight))
    return DTensor.from_local(logits, mesh, [Shard(logits.ndim - 1)], run_check=False)


def _gather_input(module: nn.Module, args: tuple[Any, ...],
                  kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    mesh: DeviceMesh = getattr(module, _MESH)
    return (gather_sequence(args[0], mesh), *args[1:]), kwargs


def install_gather(module: nn.Module, mesh: DeviceMesh) -> None:
    """The default for a gathered module: its first positional argument is the sequence."""
    module.register_forward_pre_hook(_gather_input, with_kwargs=True)


_MESH = "_moefn_tp_mesh"
_ROWS = "_moefn_tp_kv_rows"
_FORWARDS: dict[str, Callable[..., Tensor]] = {"colwise": _colwise, "rowwise": _rowwise,
                                                "vocab_embed": _vocab_embed,
                                                "vocab_head": _vocab_head}


def apply_tensor_parallel(step: TensorParallel, module: nn.Module, mesh: DeviceMesh,
                          adapter: Adapter) -> None:
    """Install ``step.style`` on ``module`` (its parameters are placed by their own step); a
    gathered module through its kind's ``install_tensor_parallel`` when it has one."""
    setattr(module, _MESH, mesh)
    if step.style == "gather":
        (adapter.install_tensor_parallel or install_gather)(module, mesh)
    elif step.style in _FORWARDS:
        setattr(module, "forward", MethodType(_FORWARDS[step.style], module))
    elif step.kv_heads is not None:
        heads, kv = step.kv_heads
        width = int(getattr(module, "out_features")) // kv
        read = kv_heads_read(heads, kv, mesh.size(), mesh.get_local_rank())
        setattr(module, _ROWS, torch.tensor([h * width + i for h in read for i in range(width)]))
        setattr(module, "forward", MethodType(_kv_heads, module))
    # other "replicate": runs whole on the gathered input as it is; the plan sums its gradient


__all__ = ["apply_tensor_parallel", "gather_sequence", "install_gather", "scatter_partial"]
