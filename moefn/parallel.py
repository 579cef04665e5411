"""One call from a model to a parallel model: plan the stages the mesh asks for, then realize.

For people moving from NeMo AutoModel's ``parallelize_model``: docs/migration.md maps each of its
arguments. Each stage argument is ``"auto"`` (on when the mesh has that axis: cp > 1, ep > 1,
more than one data-parallel rank for FSDP), ``True`` (on, default options), ``False`` (off), or
the stage's options: ``ep={"dispatch": "all_gather"}``, ``fsdp={"precision": "fp32"}``; ``ac``
also takes a mode (``ac="full"``). Nothing changes unless every stage plans and every rank agrees.

>>> import torch
>>> from moefn import MeshSpec
>>> from moefn.adapters.reference import MoETransformer, get_preset
>>> from moefn.launch import fake_world
>>> from moefn.realize import build_device_meshes
>>> with torch.device("meta"):
...     model = MoETransformer(get_preset("tiny"))
>>> with fake_world(4):  # torch's fake process group: rank 0 of 4, no communication
...     model, plan = parallelize(model, build_device_meshes(MeshSpec(dp_shard=4, ep=2), "cpu"),
...                               ac="router")
>>> plan.stages
('ep', 'ac', 'fsdp')
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Literal

from torch import nn

from moefn.plan.arguments import expect_type, shown
from moefn.plan.compose import Stage, compose, plan_or_raise
from moefn.plan.errors import ArgumentTypeError
from moefn.plan.mesh import MeshSpec
from moefn.plan.records import ShardPlan
from moefn.plan.stages import plan_ac, plan_cp, plan_ep, plan_fsdp
from moefn.realize import DeviceMeshes, realize

StageChoice = bool | Literal["auto"] | Mapping[str, object]
AC_MODES = ("none", "full", "router", "selective")


def _auto(name: str, mesh: MeshSpec) -> bool:
    """Whether ``"auto"`` turns stage ``name`` on for ``mesh``."""
    data_ranks = mesh.dp_replicate * mesh.dp_shard * mesh.cp
    return {"cp": mesh.cp > 1, "ep": mesh.ep > 1, "ac": False, "fsdp": data_ranks > 1}[name]


def _stage(name: str, factory: Callable[..., Stage], choice: object,
           mesh: MeshSpec) -> Stage | None:
    """The stage ``choice`` asks for, or None when it is off."""
    if name == "ac" and isinstance(choice, str) and choice in AC_MODES:
        choice = {"mode": choice}
    if choice == "auto":
        choice = _auto(name, mesh)
    if isinstance(choice, bool):
        return factory() if choice else None
    if not isinstance(choice, Mapping):
        modes = f', a mode {AC_MODES}' if name == "ac" else ""
        raise ArgumentTypeError.single(name, "expected True, False, \"auto\"" + modes
                                       + " or a dict of the stage's options", shown(choice),
                                       f"pass {name}=True or {name}={{...options of "
                                       f"{factory.__name__}}}")
    allowed = tuple(p for p in inspect.signature(factory).parameters if p != "mesh")
    unknown = sorted(str(key) for key in choice if key not in allowed)
    if unknown:
        raise ArgumentTypeError.single(name, f"unknown {factory.__name__} option", shown(unknown),
                                       f"use options among {allowed}")
    return factory(**choice)


def parallelize(model: nn.Module, meshes: DeviceMeshes, *, cp: StageChoice = "auto",
                ep: StageChoice = "auto", ac: StageChoice | str = False,
                fsdp: StageChoice = "auto") -> tuple[nn.Module, ShardPlan]:
    """Plan CP → EP → AC → FSDP for ``meshes.spec`` and realize the plan on ``model``, in place.

    Returns the model and its plan (print ``moefn.diff(plan)``; estimate memory from it). Raises
    PlanError (nothing planned) or RealizeError (the model untouched) naming every problem."""
    expect_type(model, nn.Module, "model", "an nn.Module", "pass the model to parallelize")
    expect_type(meshes, DeviceMeshes, "meshes", "DeviceMeshes",
                'pass build_device_meshes(MeshSpec(...), "cuda")')
    factories: dict[str, Callable[..., Stage]] = {"cp": plan_cp, "ep": plan_ep, "ac": plan_ac,
                                                  "fsdp": plan_fsdp}
    choices = {"cp": cp, "ep": ep, "ac": ac, "fsdp": fsdp}
    stages = [_stage(name, factories[name], choices[name], meshes.spec) for name in factories]
    plan = plan_or_raise(compose(*(s for s in stages if s is not None))(model, meshes.spec))
    return realize(plan, model, meshes), plan


__all__ = ["AC_MODES", "StageChoice", "parallelize"]
