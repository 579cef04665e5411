"""Appliers: one per step kind, executed generically from the plan's records (effectful)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed import ProcessGroup
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

from moefn.adapters.adapter import Adapter
from moefn.plan.records import (
    ActivationCheckpoint,
    ContextParallelAttention,
    DistributeParams,
    FullyShard,
    InstallDispatch,
    KeepDtype,
    Placement,
    Shard,
    SyncGradients,
)
from moefn.realize.dispatch import Dispatcher
from moefn.realize.gloo_reduce_scatter import use_on_gloo
from moefn.realize.meshes import DeviceMeshes
from moefn.realize.sync import gradient_sync_enabled


def torch_dtype(name: str | None) -> torch.dtype | None:
    """The torch dtype a plan names (`moefn.plan.dtypes`); None keeps the parameter's dtype."""
    dtype: torch.dtype | None = None if name is None else getattr(torch, name)
    return dtype


def to_dtensor_placement(placement: Placement) -> DPlacement:
    return DShard(placement.dim) if isinstance(placement, Shard) else DReplicate()


def apply_context_parallel(step: ContextParallelAttention, module: nn.Module,
                           meshes: DeviceMeshes, adapter: Adapter) -> None:
    adapter.install_context_parallel(module, meshes.group(step.mesh_dims), step.comm)


def apply_distribute(step: DistributeParams, module: nn.Module, meshes: DeviceMeshes,
                     root: nn.Module) -> None:
    """Each rank keeps its slice; every rank holds the same full tensor, so no data moves.
    Modules of ``root`` that share a parameter (tied embeddings) keep sharing it."""
    mesh = meshes.get(step.mesh_dims)
    placements = [to_dtensor_placement(p) for p in step.placements]
    for name in step.params:
        old = module.get_parameter(name)
        new = nn.Parameter(distribute_tensor(old.detach(), mesh, placements, src_data_rank=None),
                           requires_grad=old.requires_grad)
        for holder in root.modules():
            for key, param in list(holder._parameters.items()):
                if param is old:
                    holder.register_parameter(key, new)


def _node_groups(meshes: DeviceMeshes, ranks_per_node: int) -> tuple[ProcessGroup, ProcessGroup]:
    """(ranks with this rank's in-node index, one per node; ranks of this rank's node) of the
    ep group, created once per realize (cached on the expert mesh) and shared by every layer."""
    cache: dict[int, tuple[ProcessGroup, ProcessGroup]] = getattr(meshes.expert, _NODE_GROUPS, {})
    if ranks_per_node not in cache:
        ep = meshes.get(("ep",))
        split = ep._unflatten(0, (ep.size() // ranks_per_node, ranks_per_node),
                              ("ep_node", "ep_in_node"))
        cache[ranks_per_node] = (split["ep_node"].get_group(), split["ep_in_node"].get_group())
        setattr(meshes.expert, _NODE_GROUPS, cache)
    return cache[ranks_per_node]


_NODE_GROUPS = "_moefn_node_groups"


def apply_dispatch(step: InstallDispatch, module: nn.Module, meshes: DeviceMeshes,
                   adapter: Adapter, block: nn.Module) -> None:
    """Give experts ``module`` (in MoE block ``block``) the planned dispatcher."""
    from moefn.realize.ep_dispatch import AllGatherDispatch, AllToAllDispatch, HierarchicalDispatch

    dispatcher: Dispatcher
    if step.kind == "hierarchical":
        across, within = _node_groups(meshes, step.ranks_per_node or 1)
        dispatcher = HierarchicalDispatch(step.num_experts, across, within)
    else:
        kind = AllToAllDispatch if step.kind == "all_to_all" else AllGatherDispatch
        dispatcher = kind(step.num_experts, meshes.group(step.mesh_dims))
    adapter.install_dispatch(module, dispatcher, block)


def apply_checkpoint(step: ActivationCheckpoint, block: nn.Module, adapter: Adapter) -> None:
    from moefn.realize.activation_checkpointing import install_checkpoint

    if step.mode == "router" and adapter.install_router_replay is not None:
        adapter.install_router_replay(block)
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


def apply_sync(step: SyncGradients, steps: tuple[SyncGradients, ...], model: nn.Module,
               meshes: DeviceMeshes) -> None:
    """Hook each trainable parameter ``step`` covers most deeply among ``steps`` to all-reduce
    (sum) over its axes: expert parameters sync over the expert data-parallel axes."""
    by_depth = sorted(steps, key=lambda s: -len(s.path))
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if next(s for s in by_depth if s.path == "" or name.startswith(s.path + ".")) is step:
            param.register_hook(_SumOver(meshes.group(step.mesh_dims)))  # type: ignore[no-untyped-call]


def apply_keep_dtype(step: KeepDtype, module: nn.Module, meshes: DeviceMeshes) -> None:
    """Parameters every FSDP unit ignores: their gradients all-reduce (sum) in their own dtype."""
    for name in step.params:
        param = module.get_parameter(name)
        if param.requires_grad:
            param.register_hook(_SumOver(meshes.group(step.mesh_dims)))  # type: ignore[no-untyped-call]


def apply_fully_shard(step: FullyShard, module: nn.Module, root: nn.Module,
                      meshes: DeviceMeshes) -> None:
    """One FSDP2 unit; reductions are sums (each rank's loss is already a global-batch share)."""
    policy = MixedPrecisionPolicy(param_dtype=torch_dtype(step.param_dtype),
                                  reduce_dtype=torch_dtype(step.reduce_dtype))
    offload: OffloadPolicy = (CPUOffloadPolicy(pin_memory=meshes.device_type == "cuda")
                              if step.offload else OffloadPolicy())
    shard_dim = step.shard_dim

    def placement(_: nn.Parameter) -> DShard:
        return DShard(shard_dim)

    mesh = meshes.get(step.mesh_dims)
    fully_shard(module, mesh=mesh,
                reshard_after_forward=step.reshard_after_forward, mp_policy=policy,
                offload_policy=offload, shard_placement_fn=placement if shard_dim else None,
                ignored_params={root.get_parameter(n) for n in step.ignored} or None)
    unit = module if isinstance(module, FSDPModule) else None
    if unit is not None:
        unit.set_gradient_divide_factor(1.0)
        unit.set_force_sum_reduction_for_comms(True)
        use_on_gloo(unit, mesh)
