"""plan_cp: not available yet — it fails with a clear PlanError instead of doing nothing."""

from __future__ import annotations

from returns.result import Failure

from moefn.errors import PlanError
from moefn.mesh import MeshSpec
from moefn.plan import ShardPlan
from moefn.stage import PlanResult, Stage


def plan_cp(mesh: MeshSpec | None = None) -> Stage:
    """>>> plan_cp().name
    'cp'
    """

    def run(plan: ShardPlan) -> PlanResult:
        return Failure(PlanError.single("", "stage cp is not available yet", "plan_cp",
                                        "leave plan_cp out of the composition for now"))

    return Stage(name="cp", run=run, mesh=mesh)
