"""plan_cp: every core attention keeps its own queries and sees every key/value over ``cp``.

The sequence is split head-tail (cp rank i holds chunks i and 2·cp−1−i of 2·cp) so causal work
is even; `moefn.train.local_batch` cuts a batch that way. ``comm`` says how keys/values travel:
``"all_gather"`` (default) gathers the whole sequence's K/V on every rank; ``"p2p"`` passes K/V
blocks around the cp ring, so a rank holds its own block and one incoming (O(seq/cp) memory).
Sliding windows, chunks and attention sinks (an attention's ``mask`` fact) are applied exactly
by ``"all_gather"``; the ring refuses them.

>>> plan_cp(seq_len=4096, comm="p2p").name
'cp'
"""

from __future__ import annotations

from returns.result import Failure, Success

from moefn.plan.compose import PlanResult, Stage
from moefn.plan.errors import PlanError, Problem
from moefn.plan.mesh import MeshSpec
from moefn.plan.options import CP_COMMS, CpComm, CPOptions
from moefn.plan.records import ContextParallelAttention, ShardPlan, Step
from moefn.plan.stages.common import (
    already_parallel_problems,
    check_stage_mesh,
    gradient_sync,
    without_gradient_sync,
)


def head_tail_lengths(seq_len: int, cp: int) -> str:
    """The sequence lengths nearest ``seq_len`` that 2·cp divides (the head-tail layout).

    >>> head_tail_lengths(30, cp=4)
    '24 or 32'
    """
    lower = seq_len // (2 * cp) * (2 * cp)
    return " or ".join(str(n) for n in (lower, lower + 2 * cp) if n > 0)


def plan_cp(seq_len: int | None = None, mesh: MeshSpec | None = None,
            comm: CpComm = "all_gather") -> Stage:
    """Context parallel attention on the ``cp`` axis; ``seq_len`` (if known) is checked now;
    ``comm`` is ``"all_gather"`` or ``"p2p"`` (ring)."""
    check_stage_mesh(mesh)
    return Stage(options=CPOptions(seq_len=seq_len, comm=comm), run=_plan, mesh=mesh)


def _plan(options: CPOptions, plan: ShardPlan) -> PlanResult:
    seq_len, comm = options.seq_len, options.comm
    problems = already_parallel_problems(plan)
    if comm not in CP_COMMS:
        problems.append(Problem(path="plan_cp", message="unknown context-parallel communication",
                                value=f"comm={comm!r}",
                                fix='use comm="all_gather" or comm="p2p" (ring)'))
    cp = plan.mesh.cp
    if cp == 1:
        problems.append(Problem(path="mesh", message="plan_cp needs a cp axis larger than 1",
                                value="cp=1", fix="set cp in the mesh or leave plan_cp out"))
    if seq_len is not None and (type(seq_len) is not int or seq_len < 1):
        problems.append(Problem(path="plan_cp", message="sequence length must be a positive integer",
                                value=f"seq_len={seq_len!r}",
                                fix=f"use seq_len {2 * cp} or a multiple of it"))
    elif seq_len is not None and seq_len % (2 * cp):
        problems.append(Problem(
            path="plan_cp", message="sequence length not divisible by 2·cp (head-tail layout)",
            value=f"seq_len={seq_len}, cp={cp}",
            fix=f"use seq_len {head_tail_lengths(seq_len, cp)}"))
    targets, mixers = plan.model.paths_with("core_attention"), plan.model.paths_with("mixer")
    if not targets and not mixers:
        problems.append(Problem(path="", message="no attention module to make context-parallel",
                                value=plan.model.root_class,
                                fix="use a model whose attention moefn recognises"))
    problems += [Problem(
        path=p, message=f"{str(plan.model.module(p).get('kind', 'mixer')).replace('_', ' ')} "
                        "cannot be context-parallel yet",
        value=plan.model.module(p).cls,
        fix="leave plan_cp out for this model (CP splits the sequence for every layer, and "
            "this mixer carries its state along the whole sequence)")
        for p in mixers]
    problems += [Problem(path=p, message="attention cannot be context-parallel",
                         value=str(plan.model.module(p).get("kind", "unknown")),
                         fix="leave plan_cp out for this model")
                 for p in targets if plan.model.module(p).get("cp_supported", True) is False]
    if comm == "p2p":
        problems += [Problem(path=p, message="ring (p2p) attention masks causally only",
                             value=str(plan.model.module(p).get("mask", "")),
                             fix='use plan_cp(comm="all_gather") for this model')
                     for p in targets if plan.model.module(p).get("mask", "")]
    if problems:
        return Failure(PlanError(problems))
    steps: list[Step] = [ContextParallelAttention(stage="cp", path=p, mesh_dims=("cp",),
                                                  seq_len=seq_len, comm=comm)
                         for p in targets]
    placed = without_gradient_sync(plan).add_steps(steps)
    return Success(placed.add_steps(gradient_sync(placed, "cp")))
