"""The five planning stages. Each returns a `Stage`; none touches a process group or a module.

`stages_from` makes the stages back from a plan's recorded options, so a plan can be made again:

>>> from moefn.plan.options import EPOptions, FSDPOptions
>>> stages_from((EPOptions(dispatch="all_gather"), FSDPOptions(precision="fp32"))) == (
...     plan_ep(dispatch="all_gather"), plan_fsdp(precision="fp32"))
True
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import get_args

import attrs

from moefn.plan.arguments import expect_type
from moefn.plan.compose import Stage
from moefn.plan.options import StageName, StageOptions
from moefn.plan.stages.ac import plan_ac
from moefn.plan.stages.cp import plan_cp
from moefn.plan.stages.ep import plan_ep
from moefn.plan.stages.fsdp import plan_fsdp
from moefn.plan.stages.tp import plan_tp

FACTORIES: dict[StageName, Callable[..., Stage]] = {
    "cp": plan_cp, "tp": plan_tp, "ep": plan_ep, "ac": plan_ac, "fsdp": plan_fsdp}


def stages_from(options: Iterable[StageOptions]) -> tuple[Stage, ...]:
    """The stage each options record describes: ``compose(*stages_from(plan.options))``."""
    stages = []
    for i, record in enumerate(options):
        expect_type(record, get_args(StageOptions), f"options[{i}]", "a stage options record",
                    "pass plan.options, or records such as EPOptions(dispatch=\"all_to_all\")")
        stages.append(FACTORIES[record.stage](**attrs.asdict(record, recurse=False)))
    return tuple(stages)


__all__ = ["plan_ac", "plan_cp", "plan_ep", "plan_fsdp", "plan_tp", "stages_from"]
