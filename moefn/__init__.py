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

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from moefn.errors import PlanError, PlanFormatError, Problem, RealizeError
    from moefn.mesh import MeshSpec
    from moefn.parallel import parallelize
    from moefn.plan import ShardPlan
    from moefn.spec import ModelSpec, inspect_model
    from moefn.stage import Planner, Stage, compose, plan_or_raise
    from moefn.stages import plan_ac, plan_cp, plan_ep, plan_fsdp

# name → module; loaded on first use, so that `moefn --help` does not wait for torch
_HOMES = {
    "MeshSpec": "moefn.mesh", "ModelSpec": "moefn.spec", "PlanError": "moefn.errors",
    "PlanFormatError": "moefn.errors", "Planner": "moefn.stage", "Problem": "moefn.errors",
    "RealizeError": "moefn.errors", "ShardPlan": "moefn.plan", "Stage": "moefn.stage",
    "compose": "moefn.stage", "inspect_model": "moefn.spec", "plan_ac": "moefn.stages",
    "plan_cp": "moefn.stages", "plan_ep": "moefn.stages", "plan_fsdp": "moefn.stages",
    "plan_or_raise": "moefn.stage", "parallelize": "moefn.parallel",
}


def __getattr__(name: str) -> object:
    if name not in _HOMES:
        raise AttributeError(f"module 'moefn' has no attribute {name!r}")
    return getattr(importlib.import_module(_HOMES[name]), name)


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
    "parallelize",
    "plan_or_raise",
]
