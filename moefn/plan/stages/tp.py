"""plan_tp: tensor parallelism on attention, dense MLPs, embedding and lm_head over ``tp``.

Between those modules the residual stream is split on the sequence over tp (sequence
parallelism): norms, routers, shared experts and experts run on each tp rank's own tokens, so no
token is routed tp times, and their gradients are summed over tp (the dense data-parallel group
becomes ``dp_shard_cp_tp``). An attention or dense MLP all-gathers its input's sequence, runs
its column-wise linears on its own heads (intermediate features), and its row-wise output linear
reduce-scatters the partial sums back to sequence shards. MLA's latent projections stay whole on
every tp rank (style ``replicate``), and so do K/V projections whose heads do not divide by tp:
each rank computes the K/V heads its query heads read (`moefn.plan.tp_heads`). Every replicated
weight's gradient on a rank comes through that rank's query heads only — a distinct part — so
the gradient rule sums it over tp like the norms'. Embedding and lm_head are split on the
vocabulary; the logits stay vocabulary-sharded (a DTensor), so the loss runs under
``torch.distributed.tensor.parallel.loss_parallel`` and never gathers them.

>>> plan_tp().name
'tp'
"""

from __future__ import annotations

from returns.result import Failure, Success

from moefn.plan.compose import PlanResult, Stage
from moefn.plan.errors import PlanError, Problem
from moefn.plan.mesh import MeshSpec, divisors, nearest
from moefn.plan.options import TPOptions
from moefn.plan.records import DistributeParams, Shard, ShardPlan, Step, TensorParallel, TPStyle
from moefn.plan.roles import Role
from moefn.plan.spec import ModelSpec, TensorInfo
from moefn.plan.stages.common import (
    already_parallel_problems,
    check_stage_mesh,
    gradient_sync,
    without_gradient_sync,
)

#: Model families whose attention tensor parallelism has been checked against one process.
TP_FAMILIES = ("moefn", "transformers:qwen3_moe", "transformers:mixtral")
#: The tensor dim each sharded style splits over tp.
SHARD_DIM: dict[TPStyle, int] = {"colwise": 0, "rowwise": 1, "vocab_embed": 0, "vocab_head": 0}
#: Child linears of an attention or dense MLP, by name (reference and transformers names).
LINEAR_STYLES: dict[str, TPStyle] = {
    "q_proj": "colwise", "k_proj": "colwise", "v_proj": "colwise", "q_b_proj": "colwise",
    "kv_b_proj": "colwise", "gate_proj": "colwise", "up_proj": "colwise",
    "o_proj": "rowwise", "down_proj": "rowwise",
    "q_a_proj": "replicate", "kv_a_proj": "replicate", "kv_a_proj_with_mqa": "replicate",
}
#: The K/V projections, replicated when the attention's K/V heads do not divide by tp.
KV_LINEARS = ("k_proj", "v_proj")


def plan_tp(mesh: MeshSpec | None = None) -> Stage:
    """Tensor parallelism over the mesh's ``tp`` axis (see the module docstring)."""
    check_stage_mesh(mesh)
    return Stage(options=TPOptions(), run=_plan, mesh=mesh)


def _divides(path: str, what: str, size: int, tp: int) -> list[Problem]:
    if size % tp == 0:
        return []
    return [Problem(path=path, message=f"{what} not divisible by tp", value=f"{size}, tp={tp}",
                    fix=f"use tp in {nearest(divisors(size), tp)}")]


def _linears(spec: ModelSpec, path: str) -> list[tuple[str, TensorInfo | None]]:
    """The direct child linears of ``path`` with their weight (None when tied elsewhere)."""
    children = [m for m in spec.modules if m.path.rpartition(".")[0] == path and m.cls == "Linear"]
    return [(m.path, next(iter(spec.direct_params(m.path)), None)) for m in children]


def _weight(spec: ModelSpec, path: str) -> TensorInfo:
    """``path.weight``, or the parameter it is tied to."""
    return spec.tensor(spec.tie_of(f"{path}.weight")[0])


def _styled(spec: ModelSpec, path: str, style: TPStyle,
            kv_heads: tuple[int, int] | None = None) -> list[Step]:
    """The step for ``path``'s ``style`` and, for a sharded style, its parameters' placement (a
    weight tied to an earlier one is placed there)."""
    params = tuple(t.name.rpartition(".")[2] for t in spec.direct_params(path))
    placed: list[Step] = [DistributeParams(stage="tp", path=path, params=params, mesh_dims=("tp",),
                                           placements=(Shard(SHARD_DIM[style]),))
                          ] if style in SHARD_DIM and params else []
    return [TensorParallel(stage="tp", path=path, style=style, kv_heads=kv_heads), *placed]


def _replicated_kv(spec: ModelSpec, path: str, tp: int) -> tuple[int, int] | None:
    """``(n_heads, n_kv_heads)`` of an attention whose K/V heads do not divide by tp (its K/V
    projections are replicated), else None."""
    info = spec.module(path)
    if "attention" not in info.roles:
        return None
    heads, kv = int(info.fact("n_heads")), int(info.fact("n_kv_heads"))
    return (heads, kv) if kv % tp else None


def _module_steps(spec: ModelSpec, path: str, tp: int) -> tuple[list[Step], list[Problem]]:
    steps = _styled(spec, path, "gather")
    problems: list[Problem] = []
    info = spec.module(path)
    if "attention" in info.roles:
        problems += _divides(path, "attention heads", int(info.fact("n_heads")), tp)
    kv_heads = _replicated_kv(spec, path, tp)
    for child, weight in _linears(spec, path):
        name = child.rpartition(".")[2]
        if kv_heads is not None and name in KV_LINEARS:
            steps += _styled(spec, child, "replicate", kv_heads)
            continue
        style = LINEAR_STYLES.get(name)
        if style is None or weight is None:
            problems.append(Problem(path=child, message="linear unknown to tensor parallelism",
                                    value=spec.module(child).cls,
                                    fix=f"name it one of {sorted(LINEAR_STYLES)} or leave "
                                        "plan_tp out"))
            continue
        if style == "colwise":
            problems += _divides(child, "output features", weight.shape[0], tp)
        elif style == "rowwise":
            problems += _divides(child, "input features", weight.shape[1], tp)
            if spec.direct_params(child)[1:]:
                problems.append(Problem(path=child, message="row-wise linear with a bias",
                                        value="bias", fix="leave plan_tp out for this model"))
        steps += _styled(spec, child, style)
    return steps, problems


def _plan(options: TPOptions, plan: ShardPlan) -> PlanResult:
    del options  # no choices yet
    spec, tp = plan.model, plan.mesh.tp
    problems = already_parallel_problems(plan)
    if tp == 1:
        problems.append(Problem(path="mesh", message="plan_tp needs a tp axis larger than 1",
                                value="tp=1", fix="set tp in the mesh or leave plan_tp out"))
    if spec.family not in TP_FAMILIES:
        problems.append(Problem(path="", message="tensor parallelism is realized for "
                                f"{', '.join(TP_FAMILIES)} only so far",
                                value=f"{spec.family} ({spec.root_class})",
                                fix="leave plan_tp out (tp=1) for this model"))
    regions = (*spec.paths_with("attention"), *spec.paths_with("dense_mlp"))
    if not spec.paths_with("attention"):
        problems.append(Problem(path="", message="no attention module to split over tp",
                                value=spec.root_class,
                                fix="use a model whose attention moefn recognises"))
    steps: list[Step] = []
    for path in regions:
        found, wrong = _module_steps(spec, path, max(tp, 1))
        steps += found
        problems += wrong
    vocab: tuple[tuple[Role, TPStyle], ...] = (("embed", "vocab_embed"), ("lm_head", "vocab_head"))
    for role, style in vocab:
        for path in spec.paths_with(role):
            problems += _divides(path, "vocabulary", _weight(spec, path).shape[0], max(tp, 1))
            steps += _styled(spec, path, style)
    if problems:
        return Failure(PlanError(problems))
    placed = without_gradient_sync(plan).add_steps(steps)
    return Success(placed.add_steps(gradient_sync(placed, "tp")))
