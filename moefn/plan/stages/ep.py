"""plan_ep: experts split over the ``ep`` axis, tokens dispatched to the ranks that own them.

``"all_to_all"`` (default) sends each token once to each rank holding one of its experts;
``"hierarchical"`` sends it once to each *node* holding one (``ranks_per_node`` consecutive ep
ranks share a node), which fans it out inside; ``"all_gather"`` gathers every token everywhere.

>>> stage = plan_ep(dispatch="all_gather")
>>> stage.name
'ep'
>>> plan_ep(dispatch="hierarchical", ranks_per_node=8).name
'ep'
"""

from __future__ import annotations

from returns.result import Failure, Success

from moefn.plan.compose import PlanResult, Stage
from moefn.plan.errors import PlanError, Problem
from moefn.plan.mesh import MeshSpec, divisors, nearest
from moefn.plan.options import Dispatch, EPOptions
from moefn.plan.records import DistributeParams, InstallDispatch, Shard, ShardPlan, Step
from moefn.plan.stages.common import (
    already_parallel_problems,
    check_stage_mesh,
    gradient_sync,
    without_gradient_sync,
)


def _node_problems(dispatch: object, ranks_per_node: object, ep: int) -> list[Problem]:
    """``ranks_per_node`` is a whole divisor of ep, given exactly when dispatch is hierarchical."""
    fix = f"use ranks_per_node in {divisors(ep)} (GPUs per node, at most ep={ep})"
    if dispatch != "hierarchical":
        return [] if ranks_per_node is None else [Problem(
            path="ranks_per_node", message="ranks_per_node applies to hierarchical dispatch only",
            value=f"dispatch={dispatch!r}, ranks_per_node={ranks_per_node!r}",
            fix='leave ranks_per_node out or use dispatch="hierarchical"')]
    if type(ranks_per_node) is not int or ranks_per_node < 1:
        return [Problem(path="ranks_per_node", message="hierarchical dispatch needs a whole "
                        "number of ranks per node, at least 1", value=repr(ranks_per_node),
                        fix=fix)]
    if ep % ranks_per_node:
        return [Problem(path="ranks_per_node", message="ranks_per_node does not divide ep",
                        value=f"ranks_per_node={ranks_per_node}, ep={ep}", fix=fix)]
    return []


def plan_ep(dispatch: Dispatch = "all_to_all", mesh: MeshSpec | None = None,
            ranks_per_node: int | None = None) -> Stage:
    """Shard every MoE block's fused experts (dim 0 = expert) with ``Shard(0)`` on ``ep``."""
    check_stage_mesh(mesh)
    return Stage(options=EPOptions(dispatch=dispatch, ranks_per_node=ranks_per_node),
                 run=_plan, mesh=mesh)


def _plan(options: EPOptions, plan: ShardPlan) -> PlanResult:
    dispatch, ranks_per_node = options.dispatch, options.ranks_per_node
    problems = already_parallel_problems(plan)
    ep = plan.mesh.ep
    experts = plan.model.paths_with("experts")
    if dispatch not in ("all_to_all", "all_gather", "hierarchical"):
        problems.append(Problem(path="plan_ep", message="unknown dispatch", value=repr(dispatch),
                                fix='use "all_to_all", "all_gather" or "hierarchical"'))
    problems += _node_problems(dispatch, ranks_per_node, ep)
    if ep == 1:
        problems.append(Problem(path="mesh", message="plan_ep needs an ep axis larger than 1",
                                value="ep=1", fix="set ep in the mesh or leave plan_ep out"))
    if not experts:
        problems.append(Problem(path="", message="model has no MoE experts to parallelize",
                                value=plan.model.root_class, fix="leave plan_ep out"))
    steps: list[Step] = []
    for path in experts:
        n = int(plan.model.module(path).fact("num_experts"))
        if ep > 1 and n % ep:
            valid = nearest(tuple(d for d in divisors(plan.mesh.dp_shard * plan.mesh.cp)
                                  if n % d == 0), ep)
            problems.append(Problem(path=path, message="number of experts not divisible by ep",
                                    value=f"{n} experts, ep={ep}",
                                    fix=f"use ep in {valid}"))
            continue
        params = tuple(t.name.rpartition(".")[2] for t in plan.model.direct_params(path))
        steps.append(DistributeParams(stage="ep", path=path, params=params, mesh_dims=("ep",),
                                      placements=(Shard(0),)))
        steps.append(InstallDispatch(stage="ep", path=path, kind=dispatch, mesh_dims=("ep",),
                                     num_experts=n, ranks_per_node=ranks_per_node))
    if problems:
        return Failure(PlanError(problems))
    placed = without_gradient_sync(plan).add_steps(steps)
    return Success(placed.add_steps(gradient_sync(placed, "ep")))
