"""plan_ac: not available yet — it fails with a clear PlanError instead of doing nothing."""

from __future__ import annotations

from returns.result import Failure

from moefn.errors import PlanError
from moefn.mesh import MeshSpec
from moefn.plan import ShardPlan
from moefn.stage import PlanResult, Stage


def plan_ac(mesh: MeshSpec | None = None) -> Stage:
    """>>> plan_ac().name
    'ac'
    """

    def run(plan: ShardPlan) -> PlanResult:
        return Failure(PlanError.single("", "stage ac is not available yet", "plan_ac",
                                        "leave plan_ac out of the composition for now"))

    return Stage(name="ac", run=run, mesh=mesh)
