"""Appliers: one per step kind, executed generically from the plan's records (effectful)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.fsdp import (
    CPUOffloadPolicy,
    FSDPModule,
    MixedPrecisionPolicy,
    OffloadPolicy,
    fully_shard,
)
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.distributed.tensor import Replicate as DReplicate
from torch.distributed.tensor import Shard as DShard
from torch.distributed.tensor.placement_types import Placement as DPlacement

from moefn.accumulate import gradient_sync_enabled
from moefn.hf import is_transformers_module
from moefn.plan import (
    Checkpoint,
    ContextParallelAttention,
    DistributeParams,
    FullyShard,
    InstallDispatch,
    Placement,
    Shard,
    SyncGradients,
)
from moefn.realize.meshes import DeviceMeshes

TORCH_DTYPES: dict[str | None, torch.dtype | None] = {
    None: None, "bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}
"""The dtype names a FullyShard step may carry (None keeps the parameter's dtype)."""


def to_dtensor_placement(placement: Placement) -> DPlacement:
    return DShard(placement.dim) if isinstance(placement, Shard) else DReplicate()


def apply_context_parallel(step: ContextParallelAttention, module: nn.Module,
                           meshes: DeviceMeshes) -> None:
    from moefn.runtime.context_parallel import AllGatherKVAttention
    from moefn.runtime.ring_attention import RingKVAttention

    if is_transformers_module(module):  # through transformers' attention registry
        from moefn.hf.attention import install_context_parallel

        install_context_parallel(module, meshes.group(step.mesh_dims), step.comm)
        return
    kind = RingKVAttention if step.comm == "p2p" else AllGatherKVAttention
    setattr(module, "impl", kind(meshes.group(step.mesh_dims)))


def apply_distribute(step: DistributeParams, module: nn.Module, meshes: DeviceMeshes) -> None:
    """Each rank keeps its slice; every rank holds the same full tensor, so no data moves."""
    mesh = meshes.get(step.mesh_dims)
    placements = [to_dtensor_placement(p) for p in step.placements]
    for name in step.params:
        old = module.get_parameter(name)
        new = distribute_tensor(old.detach(), mesh, placements, src_data_rank=None)
        module.register_parameter(name, nn.Parameter(new, requires_grad=old.requires_grad))


def apply_dispatch(step: InstallDispatch, module: nn.Module, meshes: DeviceMeshes) -> None:
    from moefn.runtime.ep_dispatch import AllGatherDispatch, AllToAllDispatch

    group = meshes.group(step.mesh_dims)
    kind = AllToAllDispatch if step.kind == "all_to_all" else AllGatherDispatch
    if is_transformers_module(module):  # through transformers' experts interface
        from moefn.hf.experts import install_dispatcher

        install_dispatcher(module, kind(step.num_experts, group))
        return
    setattr(module, "dispatcher", kind(step.num_experts, group))


def apply_checkpoint(step: Checkpoint, block: nn.Module) -> None:
    from moefn.runtime.checkpointing import install_checkpoint

    if step.mode == "router" and is_transformers_module(block):  # HF routers run topk themselves
        from moefn.hf.experts import install_router_replay

        install_router_replay(block)
    install_checkpoint(block, step.mode)


class _SumOver:
    """Gradient hook: all-reduce (sum) over ``group``. Inside ``no_gradient_sync`` it keeps the
    gradient aside instead (the parameter sees zeros) and adds it to the next synced one."""

    def __init__(self, group: dist.ProcessGroup) -> None:
        self.group = group
        self.pending: Tensor | None = None

    def __call__(self, grad: Tensor) -> Tensor:
        if not gradient_sync_enabled():
            self.pending = grad if self.pending is None else self.pending + grad
            return torch.zeros_like(grad)
        total = grad.clone() if self.pending is None else grad + self.pending
        self.pending = None
        dist.all_reduce(total.to_local() if isinstance(total, DTensor) else total, group=self.group)
        return total


def apply_sync(steps: tuple[SyncGradients, ...], model: nn.Module, meshes: DeviceMeshes) -> None:
    """Register gradient hooks that all-reduce (sum) over each step's axes; the deepest path
    covering a parameter wins, so expert parameters sync over the expert data-parallel axes."""
    by_depth = sorted(steps, key=lambda s: -len(s.path))
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        step = next(s for s in by_depth if s.path == "" or name.startswith(s.path + "."))
        param.register_hook(_SumOver(meshes.group(step.mesh_dims)))  # type: ignore[no-untyped-call]


def apply_fully_shard(step: FullyShard, module: nn.Module, root: nn.Module,
                      meshes: DeviceMeshes) -> None:
    """One FSDP2 unit; reductions are sums (each rank's loss is already a global-batch share)."""
    policy = MixedPrecisionPolicy(param_dtype=TORCH_DTYPES[step.param_dtype],
                                  reduce_dtype=TORCH_DTYPES[step.reduce_dtype])
    offload: OffloadPolicy = (CPUOffloadPolicy(pin_memory=meshes.device_type == "cuda")
                              if step.offload else OffloadPolicy())
    shard_dim = step.shard_dim

    def placement(_: nn.Parameter) -> DShard:
        return DShard(shard_dim)

    fully_shard(module, mesh=meshes.get(step.mesh_dims),
                reshard_after_forward=step.reshard_after_forward, mp_policy=policy,
                offload_policy=offload, shard_placement_fn=placement if shard_dim else None,
                ignored_params={root.get_parameter(n) for n in step.ignored} or None)
    unit = module if isinstance(module, FSDPModule) else None
    if unit is not None:
        unit.set_gradient_divide_factor(1.0)
        unit.set_force_sum_reduction_for_comms(True)
