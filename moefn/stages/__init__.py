"""The four planning stages. Each returns a `Stage`; none touches a process group or a module."""

from moefn.stages.ac import plan_ac
from moefn.stages.cp import plan_cp
from moefn.stages.ep import plan_ep
from moefn.stages.fsdp import plan_fsdp

__all__ = ["plan_ac", "plan_cp", "plan_ep", "plan_fsdp"]
