"""The four planning stages. Each returns a `Stage`; none touches a process group or a module."""

from moefn.plan.stages.ac import plan_ac
from moefn.plan.stages.cp import plan_cp
from moefn.plan.stages.ep import plan_ep
from moefn.plan.stages.fsdp import plan_fsdp

__all__ = ["plan_ac", "plan_cp", "plan_ep", "plan_fsdp"]
