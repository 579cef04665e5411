"""Gradient clipping by the true global norm over parameters on different meshes.

torch's ``clip_grad_norm_`` fails when dense and expert gradients live on different meshes;
here each gradient contributes its local shard, summed over exactly the mesh dims that shard it.

>>> layer = torch.nn.Linear(2, 2)
>>> layer(torch.ones(1, 2)).pow(2).sum().backward()
>>> total = clip_grad_norm(layer.parameters(), max_norm=1.0)  # plain tensors: this process only
>>> bool(total > 0)
True
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor

from moefn.plan.arguments import expect_type, finite_number


def _shard_groups(grad: Tensor) -> tuple[tuple[DeviceMesh, int], ...]:
    if not isinstance(grad, DTensor):
        return ()
    mesh = grad.device_mesh
    return tuple((mesh, dim) for dim, p in enumerate(grad.placements)
                 if not (p.is_replicate() or p.is_partial()))  # Shard and _StridedShard


def _parameters(parameters: Iterable[torch.nn.Parameter] | Tensor) -> list[Tensor]:
    """``parameters`` as a list of tensors (a bare tensor counts as one)."""
    if isinstance(parameters, Tensor):
        return [parameters]
    expect_type(parameters, Iterable, "parameters", "an iterable of parameters",
                "pass model.parameters()")
    params = list(parameters)
    for i, p in enumerate(params):
        expect_type(p, Tensor, f"parameters[{i}]", "a Tensor", "pass model.parameters()")
    return params


def global_grad_norm(grads: Iterable[Tensor], norm_type: float = 2.0) -> Tensor:
    """The norm of all gradients as if they were full tensors in one process."""
    inf = type(norm_type) is float and norm_type == float("inf")
    if not inf:
        finite_number(norm_type, "norm_type", minimum=1.0)
    partial: dict[tuple[tuple[DeviceMesh, int], ...], Tensor] = defaultdict(
        lambda: torch.zeros((), dtype=torch.float64))
    for grad in grads:
        local = grad.to_local() if isinstance(grad, DTensor) else grad
        local = local.detach().double()
        value = local.abs().max() if inf and local.numel() else (
            local.abs().pow(norm_type).sum() if not inf else torch.zeros((), dtype=torch.float64))
        key = _shard_groups(grad)
        acc = partial[key].to(local.device)
        partial[key] = torch.maximum(acc, value) if inf else acc + value
    total = torch.zeros((), dtype=torch.float64)
    for key, value in sorted(partial.items(), key=lambda kv: repr(kv[0])):
        for mesh, dim in key:
            dist.all_reduce(value, op=dist.ReduceOp.MAX if inf else dist.ReduceOp.SUM,
                            group=mesh.get_group(dim))
        value = value.cpu()
        total = torch.maximum(total, value) if inf else total + value
    return total if inf else total.pow(1.0 / norm_type)


def clip_grad_norm(parameters: Iterable[torch.nn.Parameter], max_norm: float,
                   norm_type: float = 2.0) -> Tensor:
    """Scale gradients in place so their global norm is at most ``max_norm``; returns the norm."""
    finite_number(max_norm, "max_norm")
    params = [p for p in _parameters(parameters) if p.grad is not None]
    grads = [p.grad for p in params if p.grad is not None]
    total = global_grad_norm(grads, norm_type)
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for grad in grads:
        local = grad.to_local() if isinstance(grad, DTensor) else grad
        local.mul_(coef.to(local.device, local.dtype))
    return total.float()
