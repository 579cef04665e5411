"""realize's argument checks: run first, on every rank alike, before any other check.

Wrong types raise `ArgumentTypeError`; device meshes whose names or sizes differ from their
MeshSpec, or a process group smaller than the plan's world, raise `RealizeError`. Every rank
computes the same answer from the same global facts, so all ranks raise together (no rank waits
in a collective).
"""

from __future__ import annotations

import torch.distributed as dist
from torch import nn

from moefn.plan.arguments import expect_type
from moefn.plan.errors import Problem, RealizeError
from moefn.plan.records import ShardPlan
from moefn.realize.meshes import DeviceMeshes, expected_views


def mesh_view_problems(meshes: DeviceMeshes) -> list[Problem]:
    """Views of ``meshes`` whose dim names or sizes are not those of its MeshSpec (a plan with
    another MeshSpec is refused by realize's checks)."""
    problems = []
    for view, (names, sizes) in expected_views(meshes.spec).items():
        mesh = getattr(meshes, view)
        have = ((), ()) if mesh is None else (tuple(mesh.mesh_dim_names or ()), tuple(mesh.shape))
        if have != (names, sizes):
            problems.append(Problem(
                path=f"meshes.{view}", message="device mesh view differs from its MeshSpec",
                value=f"spec {dict(zip(names, sizes, strict=True))}, "
                      f"mesh {dict(zip(have[0], have[1], strict=False))}",
                fix="build the meshes with build_device_meshes(plan.mesh, device_type)"))
    return problems


def check_arguments(plan: ShardPlan, model: nn.Module, meshes: DeviceMeshes,
                    check_inputs: bool) -> None:
    """Raise a typed error for any argument of realize that cannot be realized as given."""
    expect_type(plan, ShardPlan, "plan", "a ShardPlan",
                "pass compose(...)(model, mesh).unwrap(); realize takes (plan, model, meshes)")
    expect_type(model, nn.Module, "model", "an nn.Module",
                "pass the model the plan was made for; realize takes (plan, model, meshes)")
    expect_type(meshes, DeviceMeshes, "meshes", "DeviceMeshes",
                "pass build_device_meshes(plan.mesh, device_type)")
    expect_type(check_inputs, bool, "check_inputs", "a bool", "pass check_inputs=True or False")
    problems = mesh_view_problems(meshes)
    world = dist.get_world_size() if dist.is_initialized() else 1
    if world < plan.mesh.world_size:
        problems.append(Problem(
            path="mesh", message="process group smaller than the plan's world",
            value=f"plan {plan.mesh.world_size} ranks, process group {world}",
            fix=f"launch {plan.mesh.world_size} ranks (torchrun --nproc-per-node ...) "
                "or re-plan for this world"))
    if problems:
        raise RealizeError(problems)
