"""`realize`: check on every rank, agree, then apply a ShardPlan's steps in order (see
`moefn.realize`)."""

from __future__ import annotations

from typing import assert_never

from torch import nn

from moefn.adapters.registry import adapter_for
from moefn.plan.records import (
    ActivationCheckpoint,
    ContextParallelAttention,
    DistributeParams,
    FullyShard,
    InstallDispatch,
    KeepDtype,
    ShardPlan,
    Step,
    SyncGradients,
    TensorParallel,
)
from moefn.plan.spec import REALIZED
from moefn.realize.agree import agree
from moefn.realize.apply import (
    apply_checkpoint,
    apply_context_parallel,
    apply_dispatch,
    apply_distribute,
    apply_fully_shard,
    apply_keep_dtype,
    apply_sync,
)
from moefn.realize.arguments import check_arguments
from moefn.realize.checks import fingerprint, local_problems
from moefn.realize.digest import value_digests
from moefn.realize.input_check import install_input_check
from moefn.realize.meshes import DeviceMeshes
from moefn.realize.tensor_parallel import apply_tensor_parallel


def _mark_realized(plan: ShardPlan, modules: dict[str, nn.Module]) -> None:
    """Tag the model and every module a step changes, so a second realize (or plan) refuses."""
    changes: dict[str, set[str]] = {"": {f"plan {fingerprint(plan)}"}}
    for step in plan.steps:
        changes.setdefault(step.path, set()).add(type(step).__name__)
    for path, kinds in changes.items():
        setattr(modules[path], REALIZED, ", ".join(sorted(kinds)))


def _realize_order(item: tuple[int, Step]) -> tuple[int, int, str]:
    """CP first, then TP and EP (parameters, forwards and dispatchers in plan order), gradient
    sync (and the all-reduce of parameters kept out of FSDP), checkpointing, and FSDP units
    inner before outer (a unit wraps its units' leftovers)."""
    index, step = item
    match step:
        case ContextParallelAttention():
            return 0, index, ""
        case TensorParallel() | DistributeParams() | InstallDispatch():
            return 1, index, ""
        case SyncGradients() | KeepDtype():
            return 2, index, ""
        case ActivationCheckpoint():
            return 3, index, ""
        case FullyShard():
            return 4, -step.path.count(".") - bool(step.path), step.path
        case _:
            assert_never(step)


def realize(plan: ShardPlan, model: nn.Module, meshes: DeviceMeshes,
            check_inputs: bool = True) -> nn.Module:
    """Apply ``plan`` to ``model`` in place and return it (works on meta-device models too).

    ``check_inputs`` (with CP) compares every forward's input shapes across each cp group."""
    check_arguments(plan, model, meshes, check_inputs)
    problems = local_problems(plan, model, meshes)
    agree(fingerprint(plan), problems, () if problems else value_digests(model))
    adapter = adapter_for(model)
    assert adapter is not None  # local_problems reports a model no adapter recognises
    modules = dict(model.named_modules())
    _mark_realized(plan, modules)
    sync = plan.steps_of(SyncGradients)
    for _, step in sorted(enumerate(plan.steps), key=_realize_order):
        match step:
            case ContextParallelAttention():
                apply_context_parallel(step, modules[step.path], meshes, adapter)
            case TensorParallel():
                apply_tensor_parallel(step, modules[step.path], meshes.get(step.mesh_dims),
                                      adapter)
            case DistributeParams():
                apply_distribute(step, modules[step.path], meshes, model)
            case InstallDispatch():
                apply_dispatch(step, modules[step.path], meshes, adapter,
                               modules[step.path.rpartition(".")[0]])
            case SyncGradients():
                apply_sync(step, sync, model, meshes)
            case KeepDtype():
                apply_keep_dtype(step, modules[step.path], meshes)
            case ActivationCheckpoint():
                apply_checkpoint(step, modules[step.path], adapter)
            case FullyShard():
                apply_fully_shard(step, modules[step.path], model, meshes)
            case _:
                assert_never(step)
    if check_inputs and plan.steps_of(ContextParallelAttention):
        install_input_check(model, meshes.get(("cp",)).get_group(), meshes.device_type)
    return model
