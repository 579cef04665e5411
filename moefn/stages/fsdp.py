"""plan_fsdp: every ``fully_shard`` unit of the model, experts' units included.

Units: each decoder block and MTP block on the dense data-parallel mesh (``dp_shard_cp``, with
``dp_replicate`` for HSDP); each experts module that plan_ep put on ``ep`` gets its own unit on the
expert data-parallel mesh (``ep_shard``), sharded on dim 1 when there are more shards than local
experts (with ``ep_shard = 1`` there is nothing left to shard: the enclosing units ignore them);
fp32-only modules get their own fp32 unit under bf16; embeddings and lm_head get units unless
tied (a tied weight stays with the root); the root last.

>>> plan_fsdp(precision="fp32").name
'fsdp'
"""

from __future__ import annotations

from typing import Literal

from attrs import evolve
from returns.result import Failure, Success

from moefn.errors import PlanError, Problem
from moefn.mesh import MeshSpec
from moefn.plan import DistributeParams, FullyShard, ShardPlan
from moefn.stage import PlanResult, Stage
from moefn.stages.common import (
    already_parallel_problems,
    dense_dp_dims,
    expert_dp_dims,
    without_gradient_sync,
)

Precision = Literal["bf16", "fp32"]
_DTYPES: dict[str, tuple[str | None, str | None]] = {
    "bf16": ("bfloat16", "float32"),
    "fp32": (None, None),
}


def plan_fsdp(
    precision: Precision = "bf16",
    reshard_after_forward: bool = True,
    offload: bool = False,
    mesh: MeshSpec | None = None,
) -> Stage:
    """FSDP2 units: param/reduce dtypes from ``precision`` (bf16 = bf16 params, fp32 reduce)."""

    def run(plan: ShardPlan) -> PlanResult:
        problems = already_parallel_problems(plan)
        if precision not in _DTYPES:
            problems.append(Problem(path="", message="unknown precision", value=repr(precision),
                                    fix='use "bf16" or "fp32"'))
        if problems:
            return Failure(PlanError(problems))
        param_dtype, reduce_dtype = _DTYPES[precision]
        spec, mesh_spec = plan.model, plan.mesh
        dense = dense_dp_dims(mesh_spec)

        def unit(path: str, dims: tuple[str, ...], shard_dim: int = 0,
                 dtypes: tuple[str | None, str | None] = (param_dtype, reduce_dtype)) -> FullyShard:
            return FullyShard(stage="fsdp", path=path, mesh_dims=dims, shard_dim=shard_dim,
                              reshard_after_forward=reshard_after_forward, param_dtype=dtypes[0],
                              reduce_dtype=dtypes[1], offload=offload)

        units: list[FullyShard] = []
        unsharded: list[str] = []  # expert params with nothing left to shard (ep_shard = 1)
        for step in plan.steps:
            if isinstance(step, DistributeParams) and "ep" in step.mesh_dims:
                dims = expert_dp_dims(mesh_spec)
                if all(mesh_spec.size(d) == 1 for d in dims):
                    unsharded += [f"{step.path}.{p}" for p in step.params]
                    continue
                local_experts = int(spec.module(step.path).fact("num_experts")) // mesh_spec.ep
                shard_dim = 1 if mesh_spec.ep_shard > local_experts else 0
                units.append(unit(step.path, dims, shard_dim))
        if param_dtype is not None:
            units += [unit(p, dense, dtypes=("float32", "float32"))
                      for p in spec.paths_with("keep_fp32")]
        units += [unit(p, dense) for p in (*spec.paths_with("block"), *spec.paths_with("mtp"))]
        for role in ("embed", "lm_head"):
            for path in spec.paths_with(role):
                params = spec.params_under(path)
                if params and all(len(spec.tie_of(t.name)) == 1 for t in params):
                    units.append(unit(path, dense))
        units.append(unit("", dense))
        units = [evolve(u, ignored=tuple(n for n in unsharded
                                         if u.path == "" or n.startswith(u.path + ".")))
                 for u in units]
        return Success(without_gradient_sync(plan).add_steps(units).with_stage("fsdp"))

    return Stage(name="fsdp", run=run, mesh=mesh)
