"""plan_fsdp: every ``fully_shard`` unit of the model, experts' units included.

Units: each decoder block and MTP block on the dense data-parallel mesh (``dp_shard_cp``, with
``dp_replicate`` for HSDP); each experts module that plan_ep put on ``ep`` gets its own unit on the
expert data-parallel mesh (``ep_shard``), sharded on dim 1 when there are more shards than local
experts (with ``ep_shard = 1`` there is nothing left to shard: the enclosing units ignore them);
fp32-only modules get their own fp32 unit under bf16; embeddings and lm_head get units unless
tied (a tied weight stays with the root; lm_head is not resharded after forward: backward
needs it at once); the root last.

>>> plan_fsdp(precision="fp32").name
'fsdp'
"""

from __future__ import annotations

from attrs import evolve
from returns.result import Failure, Success

from moefn.plan.compose import PlanResult, Stage
from moefn.plan.errors import PlanError, Problem
from moefn.plan.mesh import Axis, MeshSpec
from moefn.plan.options import FSDPOptions, Precision
from moefn.plan.records import DistributeParams, FullyShard, ShardPlan
from moefn.plan.spec import ModelSpec, TensorInfo
from moefn.plan.stages.common import (
    already_parallel_problems,
    check_stage_mesh,
    dense_dp_dims,
    expert_dp_dims,
    without_gradient_sync,
)

_DTYPES: dict[str, tuple[str | None, str | None]] = {
    "bf16": ("bfloat16", "float32"),
    "fp32": (None, None),
}
_LM_HEAD_DTYPES: dict[str, tuple[str | None, str | None]] = {
    "bf16": ("bfloat16", "float32"),
    "fp32": ("float32", "float32"),  # logits in fp32 whatever the stored dtype
}


def _has_params_left(spec: ModelSpec, unit: FullyShard) -> bool:
    return any(t.name not in unit.ignored for t in spec.params_under(unit.path))


def _covers(path: str, name: str) -> bool:
    return path == "" or name.startswith(path + ".")


def _owned(spec: ModelSpec, units: list[FullyShard]) -> dict[str, list[TensorInfo]]:
    """Each unit's trainable parameters: those under it and under no deeper unit, not ignored."""
    owned: dict[str, list[TensorInfo]] = {u.path: [] for u in units}
    deepest_first = sorted(units, key=lambda u: -len(u.path))
    for t in spec.params_under(""):
        owner = next((u for u in deepest_first if _covers(u.path, t.name)), None)
        if owner is not None and t.requires_grad and t.name not in owner.ignored:
            owned[owner.path].append(t)
    return owned


def _major_dtype(params: list[TensorInfo]) -> str:
    """The dtype holding the most trainable elements."""
    sizes: dict[str, int] = {}
    for t in params:
        sizes[t.dtype] = sizes.get(t.dtype, 0) + t.numel
    return max(sorted(sizes), key=lambda d: sizes[d])


def _split_by_dtype(spec: ModelSpec, units: list[FullyShard]
                    ) -> tuple[list[FullyShard], list[Problem]]:
    """FSDP2 needs one original dtype per unit (torch 2.13 asserts "uniform original parameter
    dtype" at the first forward). A module holding only a minority dtype (an fp32 norm or router
    in a bf16 model) becomes a unit of its own, and a unit whose parameters are all in a dtype
    other than the model's keeps them as they are (no cast of parameters or inputs: the module
    computes as it does unsharded). What cannot be split that way is a problem with the fix."""
    trainable = [t for t in spec.params_under("") if t.requires_grad]
    if not trainable:
        return units, []
    model_dtype = _major_dtype(trainable)
    by_path = {u.path: u for u in units}
    for unit, params in _owned(spec, units).items():
        if len({t.dtype for t in params}) > 1:
            major, parent = _major_dtype(params), by_path[unit]
            for t in params:
                if t.dtype != major and t.module_path not in by_path:
                    by_path[t.module_path] = evolve(
                        parent, path=t.module_path, shard_dim=0, param_dtype=None,
                        reduce_dtype=None,
                        ignored=tuple(n for n in parent.ignored if _covers(t.module_path, n)))
    problems = []
    for unit, params in _owned(spec, list(by_path.values())).items():
        first = {t.dtype: t.name for t in reversed(params)}
        if len(first) > 1:
            problems.append(Problem(
                path=unit, message="parameters of different dtypes in one FSDP unit",
                value=", ".join(f"{d} ({n})" for d, n in sorted(first.items())),
                fix="keep each dtype's parameters in modules of their own, or cast the model to "
                    "one dtype (model.to(torch.bfloat16))"))
        elif first and model_dtype not in first and by_path[unit].param_dtype not in (
                None, *first):
            by_path[unit] = evolve(by_path[unit], param_dtype=None, reduce_dtype=None)
    return list(by_path.values()), problems


def _precision_problems(spec: ModelSpec, precision: str) -> list[Problem]:
    """precision="fp32" keeps each parameter's dtype: refuse trainable ones that are not fp32."""
    if precision != "fp32":
        return []
    low = [t for t in spec.params_under("") if t.requires_grad and t.dtype != "float32"]
    return [Problem(path=low[0].name, message='precision="fp32" on parameters that are not fp32',
                    value=f"{len(low)} parameters in {sorted({t.dtype for t in low})}",
                    fix='cast the model to fp32 first (model.float()) for fp32 training, or use '
                        'precision="bf16" (bf16 compute, fp32 gradient reduction)')] if low else []


def plan_fsdp(
    precision: Precision = "bf16",
    reshard_after_forward: bool = True,
    offload: bool = False,
    lm_head_precision: Precision | None = None,
    wrap_outer_model: bool = True,
    shard_frozen: bool = False,
    mesh: MeshSpec | None = None,
) -> Stage:
    """FSDP2 units: param/reduce dtypes from ``precision`` (bf16 = bf16 params, fp32 reduce).

    ``lm_head_precision="fp32"`` computes logits in fp32; ``wrap_outer_model`` adds a root unit
    around a backbone that is not the model itself (e.g. transformers' ``model.model``);
    frozen sub-models (no trainable parameter) stay unsharded unless ``shard_frozen``.
    """
    check_stage_mesh(mesh)
    return Stage(options=FSDPOptions(
        precision=precision, reshard_after_forward=reshard_after_forward, offload=offload,
        lm_head_precision=lm_head_precision, wrap_outer_model=wrap_outer_model,
        shard_frozen=shard_frozen), run=_plan, mesh=mesh)


def _plan(options: FSDPOptions, plan: ShardPlan) -> PlanResult:
    precision, lm_head_precision = options.precision, options.lm_head_precision
    reshard_after_forward, offload = options.reshard_after_forward, options.offload
    wrap_outer_model, shard_frozen = options.wrap_outer_model, options.shard_frozen
    problems = already_parallel_problems(plan)
    problems += [Problem(path="", message="unknown precision", value=repr(p),
                         fix='use "bf16" or "fp32"')
                 for p in (precision, *([] if lm_head_precision is None else [lm_head_precision]))
                 if not isinstance(p, str) or p not in _DTYPES]
    flags = {"reshard_after_forward": reshard_after_forward, "offload": offload,
             "wrap_outer_model": wrap_outer_model, "shard_frozen": shard_frozen}
    problems += [Problem(path="", message=f"{name} must be a bool", value=repr(flag),
                         fix=f"use {name}=True or False")
                 for name, flag in flags.items() if type(flag) is not bool]
    problems += _precision_problems(plan.model, precision)
    if problems:
        return Failure(PlanError(problems))
    param_dtype, reduce_dtype = _DTYPES[precision]
    spec, mesh_spec = plan.model, plan.mesh
    dense = dense_dp_dims(mesh_spec)

    def unit(path: str, dims: tuple[Axis, ...], shard_dim: int = 0,
             dtypes: tuple[str | None, str | None] = (param_dtype, reduce_dtype)) -> FullyShard:
        return FullyShard(stage="fsdp", path=path, mesh_dims=dims, shard_dim=shard_dim,
                          reshard_after_forward=reshard_after_forward, param_dtype=dtypes[0],
                          reduce_dtype=dtypes[1], offload=offload)

    units: list[FullyShard] = []
    unsharded: list[str] = []  # expert params with nothing left to shard (ep_shard = 1)
    for step in plan.steps:
        if isinstance(step, DistributeParams) and "ep" in step.mesh_dims:
            dims = expert_dp_dims(mesh_spec)
            if all(mesh_spec.size(d) == 1 for d in dims):
                unsharded += [f"{step.path}.{p}" for p in step.params]
                continue
            # fewer local experts than shards: dim 1 (FSDP2 shards dims > 0 only evenly;
            # otherwise dim 0, padded, where some ranks hold no expert rows)
            local_experts = int(spec.module(step.path).fact("num_experts")) // mesh_spec.ep
            even = all(t.shape[1] % mesh_spec.ep_shard == 0
                       for t in spec.params_under(step.path) if len(t.shape) > 1)
            shard_dim = 1 if mesh_spec.ep_shard > local_experts and even else 0
            units.append(unit(step.path, dims, shard_dim))
    if param_dtype is not None:
        units += [unit(p, dense, dtypes=("float32", "float32"))
                  for p in spec.paths_with("keep_fp32")]
    units += [unit(p, dense) for p in (*spec.paths_with("block"), *spec.paths_with("mtp"))]
    for role in ("embed", "lm_head"):
        for path in spec.paths_with(role):
            params = spec.params_under(path)
            dtypes = (_LM_HEAD_DTYPES[lm_head_precision] if role == "lm_head" and lm_head_precision
                      else (param_dtype, reduce_dtype))
            if params and all(len(spec.tie_of(t.name)) == 1 for t in params):
                # lm_head runs last in forward and first in backward: resharding it in
                # between would only all-gather it again at once
                units.append(evolve(unit(path, dense, dtypes=dtypes),
                                    reshard_after_forward=reshard_after_forward
                                    and role != "lm_head"))
    # the outer units (the backbone, the root) stay gathered through their whole forward
    # and are needed again as backward starts: resharding them in between only costs an
    # all-gather, never memory
    outer = [p for p in spec.paths_with("backbone") if p]
    if wrap_outer_model or not outer:
        outer.append("")
    units += [evolve(unit(p, dense), reshard_after_forward=False) for p in outer]
    if not shard_frozen:
        unsharded += [t.name for t in spec.tensors if not t.is_buffer and not t.requires_grad]
    units = [evolve(u, ignored=tuple(n for n in unsharded
                                     if u.path == "" or n.startswith(u.path + ".")))
             for u in units]
    units, problems = _split_by_dtype(spec, [u for u in units if _has_params_left(spec, u)])
    if problems:
        return Failure(PlanError(problems))
    return Success(without_gradient_sync(plan).add_steps(units))
