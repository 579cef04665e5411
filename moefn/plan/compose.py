"""Stages and their left-to-right composition.

A stage is a frozen record of its options (`moefn.plan.options`) and a pure planning function
``(options, ShardPlan) -> Result[ShardPlan, PlanError]``; calling it records the options in the
plan. `compose` runs stages left to right (as you read them) on the snapshot of a model and a
MeshSpec. Stages with equal options are equal:

>>> import torch
>>> from moefn import MeshSpec, compose, plan_ep, plan_fsdp
>>> from moefn.adapters.reference import MoETransformer, get_preset
>>> with torch.device("meta"):
...     model = MoETransformer(get_preset("tiny"))
>>> planner = compose(plan_fsdp(precision="fp32"))
>>> planner(model, MeshSpec(dp_shard=4)).unwrap().stages
('fsdp',)
>>> plan_ep() == plan_ep(dispatch="all_to_all")
True
>>> plan_ep()
Stage(options=EPOptions(dispatch='all_to_all', ranks_per_node=None), mesh=None)
>>> compose(plan_ep())(model, MeshSpec(dp_shard=4))  # doctest: +ELLIPSIS
<Failure: 1 problem:
  mesh: plan_ep needs an ep axis larger than 1 ...>
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from attrs import field, frozen
from returns.result import Failure, Result, Success
from toolz import compose_left
from torch import nn

from moefn.plan.arguments import expect_type
from moefn.plan.errors import PlanError
from moefn.plan.mesh import MeshSpec
from moefn.plan.options import StageOptions
from moefn.plan.records import STAGE_ORDER, ShardPlan, StageName
from moefn.plan.spec import inspect_model

PlanResult = Result[ShardPlan, PlanError]


@frozen(kw_only=True)
class Stage:
    """A planning step and its options; call it on a plan to get the next plan (recording
    ``options``) or every problem found.

    Problems come back as a Failure, never raised: a PlanError raised inside ``run`` (by a
    helper such as `ModuleInfo.fact`) becomes the Failure too. ``run`` is a module-level
    function, so stages with equal options compare equal."""

    options: StageOptions
    run: Callable[[Any, ShardPlan], PlanResult] = field(repr=False)  # takes ``options``
    mesh: MeshSpec | None = None

    @property
    def name(self) -> StageName:
        return self.options.stage

    def __call__(self, plan: ShardPlan) -> PlanResult:
        if self.name in plan.stages:
            return Failure(PlanError.single(
                "", f"stage {self.name} already applied to this plan", plan.stages,
                "apply each stage once"))
        if self.mesh is not None and self.mesh != plan.mesh:
            return Failure(_mesh_conflict(self.mesh, plan.mesh))
        later = [s for s in plan.stages if STAGE_ORDER.index(s) > STAGE_ORDER.index(self.name)]
        if later:
            return Failure(_order_error((*plan.stages, self.name)))
        try:
            return self.run(self.options, plan).map(lambda done: done.with_stage(self.options))
        except PlanError as err:  # a helper's (ModelSpec.module, MeshSpec.size, ...): one channel
            return Failure(err)


def _order_error(names: tuple[str, ...]) -> PlanError:
    return PlanError.single("", "stages out of the canonical order", " → ".join(names),
                            f"compose stages in the order {', '.join(STAGE_ORDER)} "
                            "(any may be left out)")


def _mesh_conflict(a: MeshSpec, b: MeshSpec) -> PlanError:
    return PlanError.single("mesh", "two different meshes in one composition",
                            f"{a.as_text()} vs {b.as_text()}", "give one MeshSpec")


@frozen
class Planner:
    """The composition of stages; call it with a model (meta is enough) and a MeshSpec."""

    stages: tuple[Stage, ...]

    def __call__(self, model: nn.Module, mesh: MeshSpec | None = None) -> PlanResult:
        names = tuple(s.name for s in self.stages)
        try:
            expect_type(model, nn.Module, "model", "an nn.Module",
                        "pass the model (build it on the meta device to plan without memory)")
        except PlanError as err:
            return Failure(err)
        if mesh is not None and not isinstance(mesh, MeshSpec):
            return Failure(PlanError.single("mesh", "mesh is not a MeshSpec", repr(mesh),
                                            "pass MeshSpec(...) or MeshSpec.parse(text)"))
        if list(names) != sorted(names, key=STAGE_ORDER.index) or len(set(names)) != len(names):
            return Failure(_order_error(names))
        meshes = [m for m in (mesh, *(s.mesh for s in self.stages)) if m is not None]
        if not meshes:
            return Failure(PlanError.single("mesh", "no mesh given", None,
                                            "pass a MeshSpec to the planner or to a stage"))
        conflicts = [m for m in meshes if m != meshes[0]]
        if conflicts:
            return Failure(_mesh_conflict(meshes[0], conflicts[0]))
        if meshes[0].tp > 1 and "tp" not in names:
            return Failure(PlanError.single(
                "mesh", "a tp axis without plan_tp (its ranks would train on the same tokens)",
                f"tp={meshes[0].tp}", "add plan_tp() to the stages or set tp=1"))
        try:
            spec = inspect_model(model)
        except PlanError as err:
            return Failure(err)
        seed: PlanResult = Success(ShardPlan.empty(spec, meshes[0]))
        pipeline: Callable[[PlanResult], PlanResult] = compose_left(
            *(_bind(stage) for stage in self.stages))
        return pipeline(seed)


def _bind(stage: Stage) -> Callable[[PlanResult], PlanResult]:
    def step(result: PlanResult) -> PlanResult:
        return result.bind(stage)

    return step


def plan_or_raise(result: PlanResult) -> ShardPlan:
    """The plan, or raise the PlanError itself (``result.unwrap()`` raises returns' own error)."""
    expect_type(result, Result, "result", "a Result", "pass what compose(...)(model, mesh) returns")
    if isinstance(result, Failure):
        raise result.failure()
    return result.unwrap()


def compose(*stages: Stage) -> Planner:
    """Compose stages left to right: ``compose(plan_ep(...), plan_fsdp(...))(model, mesh)``."""
    for i, stage in enumerate(stages):
        expect_type(stage, Stage, f"compose argument {i}", "a Stage",
                    "pass stages made by plan_cp(), plan_ep(), plan_ac() or plan_fsdp()")
    return Planner(tuple(stages))
