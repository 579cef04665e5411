"""plan_ac: activation checkpointing of decoder and MTP blocks.

Modes: ``"router"`` (default) — full recompute, except that each router's top-k choice is
recorded and replayed, so recompute cannot pick different experts; ``"full"`` — recompute
everything; ``"selective"`` — save matmuls, attention, collectives and top-k, recompute the rest; ``"none"``.

>>> plan_ac(mode="selective", skip=("layers.0",), every=2).name
'ac'
"""

from __future__ import annotations

import fnmatch

from returns.result import Failure, Success

from moefn.plan.arguments import shown
from moefn.plan.compose import PlanResult, Stage
from moefn.plan.errors import ArgumentTypeError, PlanError, Problem
from moefn.plan.mesh import MeshSpec
from moefn.plan.options import ACOptions, Mode
from moefn.plan.records import ActivationCheckpoint, ContextParallelAttention, ShardPlan
from moefn.plan.stages.common import already_parallel_problems, check_stage_mesh

SAVES: dict[str, tuple[str, ...]] = {
    "full": (),
    "router": ("router top-k (replayed on recompute)",),
    "selective": ("matmul", "grouped_mm", "attention", "collectives", "top-k",
                  "device-to-host copies"),
}


def plan_ac(mode: Mode = "router", skip: tuple[str, ...] = (), every: int = 1,
            mesh: MeshSpec | None = None) -> Stage:
    """Checkpoint every ``every``-th block (and MTP blocks) not matching a ``skip`` glob."""
    check_stage_mesh(mesh)
    globs = (skip,) if isinstance(skip, str) else skip
    if not isinstance(globs, tuple | list) or not all(isinstance(g, str) for g in globs):
        raise ArgumentTypeError.single("skip", "expected a tuple of glob strings", shown(skip),
                                       'pass skip=("layers.0",) or skip=()')
    globs = tuple(globs)
    return Stage(options=ACOptions(mode=mode, skip=globs, every=every), run=_plan, mesh=mesh)


def _plan(options: ACOptions, plan: ShardPlan) -> PlanResult:
    mode, globs, every = options.mode, options.skip, options.every
    problems = already_parallel_problems(plan)
    if mode not in (*SAVES, "none"):
        problems.append(Problem(path="plan_ac", message="unknown checkpoint mode", value=repr(mode),
                                fix=f"use one of {(*SAVES, 'none')}"))
    if type(every) is not int:
        problems.append(Problem(path="plan_ac", message="every must be an integer",
                                value=repr(every), fix="use every=1 for all blocks, 2 for every other"))
    elif every < 1:
        problems.append(Problem(path="plan_ac", message="every must be at least 1",
                                value=str(every), fix="use every=1 for all blocks"))
    if mode == "selective" and any(s.comm == "p2p"
                                    for s in plan.steps_of(ContextParallelAttention)):
        problems.append(Problem(
            path="", message="selective checkpointing cannot save ring attention (its "
            "point-to-point sends run inside an autograd function, not as one savable op)",
            value='mode="selective" with plan_cp(comm="p2p")',
            fix='use mode="router" or "full", or plan_cp(comm="all_gather")'))
    blocks = plan.model.paths_with("block")
    problems += [Problem(path=glob, message="skip pattern matches no block", value=repr(glob),
                         fix=f"use block paths such as {blocks[:2]}")
                 for glob in globs if not any(fnmatch.fnmatchcase(b, glob) for b in blocks)]
    if problems:
        return Failure(PlanError(problems))
    if mode == "none":
        return Success(plan)
    chosen = [b for i, b in enumerate(blocks) if i % every == 0]
    chosen += list(plan.model.paths_with("mtp"))
    steps = [ActivationCheckpoint(stage="ac", path=p, mode=mode, saves=SAVES[mode])
             for p in chosen if not any(fnmatch.fnmatchcase(p, glob) for glob in globs)]
    return Success(plan.add_steps(steps))
