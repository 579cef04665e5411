"""moefn: plan Mixture-of-Experts parallelism (CP, EP, AC, FSDP2) as data, apply it once.

>>> import torch
>>> from moefn import MeshSpec, compose, plan_ep, plan_fsdp
>>> from moefn.models import MoETransformer, get_preset
>>> with torch.device("meta"):
...     model = MoETransformer(get_preset("tiny"))
>>> plan = compose(plan_ep(), plan_fsdp())(model, MeshSpec(dp_shard=4, ep=2)).unwrap()
>>> plan.stages
('ep', 'fsdp')
"""

from moefn.errors import PlanError, PlanFormatError, Problem, RealizeError
from moefn.mesh import MeshSpec
from moefn.plan import ShardPlan
from moefn.spec import ModelSpec, inspect_model
from moefn.stage import Planner, Stage, compose, plan_or_raise
from moefn.stages import plan_ac, plan_cp, plan_ep, plan_fsdp

__all__ = [
    "MeshSpec",
    "ModelSpec",
    "PlanError",
    "PlanFormatError",
    "Planner",
    "Problem",
    "RealizeError",
    "ShardPlan",
    "Stage",
    "compose",
    "inspect_model",
    "plan_ac",
    "plan_cp",
    "plan_ep",
    "plan_fsdp",
    "plan_or_raise",
]
