"""Everything realize verifies before it changes anything (reads only)."""

from __future__ import annotations

import hashlib

import torch.distributed as dist
from torch import nn

from moefn.adapters.adapter import Adapter
from moefn.adapters.registry import adapter_for
from moefn.analyse.layout import fsdp_shard_ranks
from moefn.plan.dtypes import CAST_DTYPES
from moefn.plan.errors import PlanError, Problem
from moefn.plan.records import (
    ContextParallelAttention,
    DistributeParams,
    FullyShard,
    InstallDispatch,
    KeepDtype,
    Shard,
    ShardPlan,
)
from moefn.plan.serialize import to_json
from moefn.plan.spec import ModelSpec, inspect_model
from moefn.realize.meshes import DeviceMeshes


def _structure_problems(planned: ModelSpec, actual: ModelSpec) -> list[Problem]:
    want = {t.name: t for t in planned.tensors}
    have = {t.name: t for t in actual.tensors}
    problems = [Problem(path=n, message="tensor in the plan is missing from the model", value=n,
                        fix="realize the plan on the model it was made for")
                for n in sorted(set(want) - set(have))]
    problems += [Problem(path=n, message="tensor in the model is not in the plan", value=n,
                         fix="re-plan this model")
                 for n in sorted(set(have) - set(want))]
    for name in sorted(set(want) & set(have)):
        a, b = want[name], have[name]
        if (a.shape, a.dtype, a.requires_grad) != (b.shape, b.dtype, b.requires_grad):
            problems.append(Problem(
                path=name, message="tensor differs from the plan",
                value=f"planned {list(a.shape)} {a.dtype} requires_grad={a.requires_grad}, "
                      f"model {list(b.shape)} {b.dtype} requires_grad={b.requires_grad}",
                fix="re-plan this model"))
    if planned.tied != actual.tied and not problems:
        problems.append(Problem(path="", message="tied parameters differ from the plan",
                                value=f"planned {planned.tied}, model {actual.tied}",
                                fix="re-plan this model"))
    return problems


def _module_problems(plan: ShardPlan, model: nn.Module, adapter: Adapter) -> list[Problem]:
    modules = dict(model.named_modules())
    problems: list[Problem] = []
    for step in plan.steps:
        module = modules.get(step.path)
        if module is None:
            problems.append(Problem(path=step.path, message="module in the plan is missing",
                                    value=type(step).__name__, fix="re-plan this model"))
        elif isinstance(step, InstallDispatch) and not adapter.accepts_dispatch(module):
            problems.append(Problem(path=step.path, message="module has no token dispatcher",
                                    value=type(module).__name__,
                                    fix="plan EP only for recognised experts modules"))
        elif (isinstance(step, ContextParallelAttention)
              and not adapter.accepts_context_parallel(module)):
            problems.append(Problem(path=step.path, message="module has no attention impl",
                                    value=type(module).__name__,
                                    fix="plan CP only for recognised core attention modules"))
        elif isinstance(step, DistributeParams | KeepDtype):
            own = dict(module.named_parameters(recurse=False))
            problems += [Problem(path=f"{step.path}.{p}", message="parameter missing", value=p,
                                 fix="re-plan this model") for p in step.params if p not in own]
    return problems


def _unit_problems(step: FullyShard, params: dict[str, nn.Parameter],
                   ranks: int) -> list[Problem]:
    allowed = (None, *CAST_DTYPES)
    problems = [Problem(path=step.path, message="unknown dtype in an FSDP unit", value=repr(d),
                        fix=f"use one of {allowed}")
                for d in (step.param_dtype, step.reduce_dtype) if d not in allowed]
    problems += [Problem(path=n, message="ignored parameter is not in the model", value=n,
                         fix="re-plan this model") for n in step.ignored if n not in params]
    prefix = f"{step.path}." if step.path else ""
    short = [n for n, p in params.items()
             if n.startswith(prefix) and n not in step.ignored and p.dim() <= step.shard_dim]
    if step.shard_dim < 0 or short:
        problems.append(Problem(path=step.path, message="shard_dim out of range",
                                value=f"shard_dim={step.shard_dim} ({short[:1]})",
                                fix="re-plan this model"))
    elif step.shard_dim > 0:
        problems += [Problem(path=n, message=f"FSDP2 shards dim {step.shard_dim} only evenly",
                             value=f"size {p.shape[step.shard_dim]} over {ranks} ranks",
                             fix="shard dim 0 (plan_fsdp does when a dim > 0 is uneven)")
                     for n, p in params.items() if n.startswith(prefix) and n not in step.ignored
                     and p.shape[step.shard_dim] % ranks]
    return problems


def _placement_problems(step: DistributeParams, params: dict[str, nn.Parameter]) -> list[Problem]:
    problems = [] if len(step.placements) == len(step.mesh_dims) else [Problem(
        path=step.path, message="placements and mesh_dims differ",
        value=f"{len(step.placements)} placements, {len(step.mesh_dims)} mesh dims",
        fix="re-plan this model")]
    for name in step.params:
        param = params.get(f"{step.path}.{name}" if step.path else name)
        if param is None:
            continue  # reported by _module_problems
        problems += [Problem(path=f"{step.path}.{name}", message="Shard dim out of range",
                             value=f"{p} on a {param.dim()}-dim parameter", fix="re-plan this model")
                     for p in step.placements if isinstance(p, Shard) and not 0 <= p.dim < param.dim()]
    return problems


def _step_problems(plan: ShardPlan, model: nn.Module, actual: ModelSpec,
                   meshes: DeviceMeshes) -> list[Problem]:
    """Every field realize will act on, checked before anything changes."""
    problems: list[Problem] = []
    params = dict(model.named_parameters())
    for step in plan.steps:
        if hasattr(step, "mesh_dims"):
            try:
                meshes.get(step.mesh_dims)
            except PlanError as err:
                problems += err.problems
                continue
        if isinstance(step, FullyShard):
            problems += _unit_problems(step, params, fsdp_shard_ranks(step, plan.mesh))
        elif isinstance(step, DistributeParams):
            problems += _placement_problems(step, params)
        elif isinstance(step, InstallDispatch):
            have = actual.module(step.path).get("num_experts", -1)
            if have != step.num_experts:
                problems.append(Problem(path=step.path, message="dispatch expert count differs",
                                        value=f"plan {step.num_experts}, module {have} experts",
                                        fix="re-plan this model"))
    return problems


def _device_problems(model: nn.Module, meshes: DeviceMeshes) -> list[Problem]:
    kinds = {p.device.type for p in model.parameters()} - {"meta"}
    wrong = sorted(kinds - {meshes.device_type})
    return [Problem(path="", message="parameters are on a device the mesh does not use",
                    value=f"{wrong} vs mesh {meshes.device_type}",
                    fix=f"move the model to {meshes.device_type} (or build it on meta)")] if wrong \
        else []


def local_problems(plan: ShardPlan, model: nn.Module, meshes: DeviceMeshes) -> list[Problem]:
    """Every reason this rank cannot realize ``plan`` on ``model`` (empty when it can)."""
    try:
        actual = inspect_model(model)
    except PlanError as err:
        return list(err.problems)
    problems = [Problem(path=item.partition(":")[0], message="model is already parallelized",
                        value=item.partition(": ")[2], fix="realize on a fresh model")
                for item in actual.already_parallel]
    if meshes.spec != plan.mesh:
        problems.append(Problem(path="mesh", message="device mesh differs from the plan's mesh",
                                value=f"plan {plan.mesh.as_text()}, mesh {meshes.spec.as_text()}",
                                fix="build the device mesh from plan.mesh"))
    if dist.is_initialized() and dist.get_world_size() != plan.mesh.world_size:
        problems.append(Problem(path="mesh", message="world size differs from the plan",
                                value=f"plan {plan.mesh.world_size}, world "
                                      f"{dist.get_world_size()}",
                                fix="launch as many ranks as the plan's mesh has"))
    problems += _structure_problems(plan.model, actual)
    adapter = adapter_for(model)
    if adapter is None:
        problems.append(Problem(path="", message="no adapter realizes this model kind",
                                value=type(model).__name__,
                                fix="register one: moefn.adapters.registry.register_adapter(...)"))
    if not problems and adapter is not None:
        problems += _module_problems(plan, model, adapter) + _device_problems(model, meshes)
    if not problems:
        problems += _step_problems(plan, model, actual, meshes)
    return problems


def fingerprint(plan: ShardPlan) -> str:
    return hashlib.sha256(to_json(plan).encode()).hexdigest()[:16]
