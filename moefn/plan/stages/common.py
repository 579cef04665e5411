"""Checks and helpers shared by the stages (pure)."""

from __future__ import annotations

from attrs import evolve

from moefn.plan.arguments import expect_type
from moefn.plan.errors import Problem
from moefn.plan.mesh import Axis, MeshSpec
from moefn.plan.records import DistributeParams, ShardPlan, StageName, SyncGradients


def already_parallel_problems(plan: ShardPlan) -> list[Problem]:
    return [Problem(path=item.partition(":")[0], message="model is already parallelized",
                    value=item.partition(": ")[2],
                    fix="plan the unparallelized model (build it fresh, e.g. on the meta device)")
            for item in plan.model.already_parallel]


def check_stage_mesh(mesh: object) -> None:
    """A stage's optional ``mesh`` must be a MeshSpec (raises ArgumentTypeError otherwise)."""
    expect_type(mesh, (MeshSpec, type(None)), "mesh", "a MeshSpec or None",
                "pass MeshSpec(...) or MeshSpec.parse(text)")


def dense_dp_dims(mesh: MeshSpec) -> tuple[Axis, ...]:
    """Data-parallel axes of dense parameters: dp_shard_cp (with dp_replicate for HSDP); with tp,
    dp_shard_cp_tp — they see tp-distinct tokens (or, inside a tensor-parallel module, partial
    sums), so their gradients are summed over tp too."""
    group: Axis = "dp_shard_cp_tp" if mesh.tp > 1 else "dp_shard_cp"
    return ("dp_replicate", group) if mesh.dp_replicate > 1 else (group,)


def tp_sharded_dp_dims(mesh: MeshSpec) -> tuple[Axis, ...]:
    """Data-parallel axes of parameters sharded over tp: dp_shard_cp (with dp_replicate)."""
    return ("dp_replicate", "dp_shard_cp") if mesh.dp_replicate > 1 else ("dp_shard_cp",)


def expert_dp_dims(mesh: MeshSpec) -> tuple[Axis, ...]:
    """Data-parallel axes of expert parameters: ep_shard (with dp_replicate for HSDP)."""
    return ("dp_replicate", "ep_shard") if mesh.dp_replicate > 1 else ("ep_shard",)


def without_gradient_sync(plan: ShardPlan) -> ShardPlan:
    return evolve(plan, steps=tuple(s for s in plan.steps if not isinstance(s, SyncGradients)))


def gradient_sync(plan: ShardPlan, stage: StageName) -> tuple[SyncGradients, ...]:
    """How gradients stay in sync without FSDP (plan_fsdp replaces these steps by its units).

    Dense parameters all-reduce (sum) over the dense data-parallel axes; modules whose parameters
    a stage put on the ``ep`` axis all-reduce over the expert data-parallel axes instead, and
    those `plan_tp` sharded over tp over the others (`tp_sharded_dp_dims`).
    """
    if plan.mesh.world_size == 1:
        return ()
    expert_paths = sorted({s.path for s in plan.steps_of(DistributeParams) if "ep" in s.mesh_dims})
    return (
        SyncGradients(stage=stage, path="", mesh_dims=dense_dp_dims(plan.mesh)),
        *(SyncGradients(stage=stage, path=p, mesh_dims=tp_sharded_dp_dims(plan.mesh))
          for p in plan.tp_sharded_paths()),
        *(SyncGradients(stage=stage, path=p, mesh_dims=expert_dp_dims(plan.mesh))
          for p in expert_paths),
    )
