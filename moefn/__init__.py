"""moefn: plan Mixture-of-Experts parallelism (CP, EP, AC, FSDP2) as data, apply it once.

>>> import torch
>>> from moefn import MeshSpec, compose, plan_ep, plan_fsdp, stages_from
>>> from moefn.adapters.reference import MoETransformer, get_preset
>>> with torch.device("meta"):
...     model = MoETransformer(get_preset("tiny"))
>>> plan = compose(plan_ep(), plan_fsdp())(model, MeshSpec(dp_shard=4, ep=2)).unwrap()
>>> plan.stages
('ep', 'fsdp')
>>> plan.options[0]
EPOptions(dispatch='all_to_all', ranks_per_node=None)
>>> compose(*stages_from(plan.options))(model, plan.mesh).unwrap() == plan
True
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from moefn.analyse.render import diff
    from moefn.parallel import parallelize
    from moefn.plan.compose import Planner, Stage, compose, plan_or_raise
    from moefn.plan.errors import PlanError, PlanFormatError, Problem, RealizeError
    from moefn.plan.mesh import MeshSpec
    from moefn.plan.options import ACOptions, CPOptions, EPOptions, FSDPOptions, TPOptions
    from moefn.plan.records import ShardPlan
    from moefn.plan.serialize import from_json, to_json
    from moefn.plan.spec import ModelSpec, inspect_model
    from moefn.plan.stages import plan_ac, plan_cp, plan_ep, plan_fsdp, plan_tp, stages_from

# name → module; loaded on first use, so that `moefn --help` does not wait for torch
_HOMES = {
    "MeshSpec": "moefn.plan.mesh", "ModelSpec": "moefn.plan.spec",
    "PlanError": "moefn.plan.errors", "PlanFormatError": "moefn.plan.errors",
    "Planner": "moefn.plan.compose", "Problem": "moefn.plan.errors",
    "RealizeError": "moefn.plan.errors", "ShardPlan": "moefn.plan.records",
    "Stage": "moefn.plan.compose", "compose": "moefn.plan.compose",
    "inspect_model": "moefn.plan.spec", "plan_ac": "moefn.plan.stages",
    "plan_cp": "moefn.plan.stages", "plan_ep": "moefn.plan.stages",
    "plan_fsdp": "moefn.plan.stages", "plan_or_raise": "moefn.plan.compose",
    "to_json": "moefn.plan.serialize", "from_json": "moefn.plan.serialize",
    "diff": "moefn.analyse.render", "parallelize": "moefn.parallel",
    "stages_from": "moefn.plan.stages", "ACOptions": "moefn.plan.options",
    "CPOptions": "moefn.plan.options", "EPOptions": "moefn.plan.options",
    "FSDPOptions": "moefn.plan.options", "TPOptions": "moefn.plan.options",
    "plan_tp": "moefn.plan.stages",
}


def __getattr__(name: str) -> object:
    if name not in _HOMES:
        raise AttributeError(f"module 'moefn' has no attribute {name!r}")
    return getattr(importlib.import_module(_HOMES[name]), name)


__all__ = [
    "ACOptions",
    "CPOptions",
    "EPOptions",
    "FSDPOptions",
    "MeshSpec",
    "ModelSpec",
    "PlanError",
    "PlanFormatError",
    "Planner",
    "Problem",
    "RealizeError",
    "ShardPlan",
    "Stage",
    "TPOptions",
    "compose",
    "diff",
    "from_json",
    "inspect_model",
    "plan_ac",
    "plan_cp",
    "plan_ep",
    "plan_fsdp",
    "plan_tp",
    "parallelize",
    "plan_or_raise",
    "stages_from",
    "to_json",
]


def __dir__() -> list[str]:
    """The public names too (they load lazily), for dir() and tab completion."""
    return sorted({*globals(), *__all__})
