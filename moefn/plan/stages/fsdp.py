"""plan_fsdp: every ``fully_shard`` unit of the model, experts' units included.

Units: each decoder block and MTP block on the dense data-parallel mesh (``dp_shard_cp``, with
``dp_replicate`` for HSDP); each experts module that plan_ep put on ``ep`` gets its own unit on the
expert data-parallel mesh (``ep_shard``), sharded on dim 1 when there are more shards than local
experts (with ``ep_shard = 1`` there is nothing left to shard: the enclosing units ignore them);
parameters that keep their own dtype (fp32 norms, routers and Mamba's ``A_log`` under bf16)
get units of their own or stay out of FSDP with an fp32 gradient all-reduce
(`moefn.plan.stages.dtypes`); embeddings and lm_head get units unless
tied (a tied weight stays with the root); the root last. lm_head and the last block (MTP's
when there is one) are not resharded after forward: backward needs them at once.

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
from moefn.plan.spec import ModelSpec
from moefn.plan.stages.common import (
    already_parallel_problems,
    check_stage_mesh,
    dense_dp_dims,
    expert_dp_dims,
    tp_sharded_dp_dims,
    without_gradient_sync,
)
from moefn.plan.stages.dtypes import place_kept

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
    problems += [Problem(path="plan_fsdp", message="unknown precision", value=repr(p),
                         fix='use "bf16" or "fp32"')
                 for p in (precision, *([] if lm_head_precision is None else [lm_head_precision]))
                 if not isinstance(p, str) or p not in _DTYPES]
    flags = {"reshard_after_forward": reshard_after_forward, "offload": offload,
             "wrap_outer_model": wrap_outer_model, "shard_frozen": shard_frozen}
    problems += [Problem(path="plan_fsdp", message=f"{name} must be a bool", value=repr(flag),
                         fix=f"use {name}=True or False")
                 for name, flag in flags.items() if type(flag) is not bool]
    problems += _precision_problems(plan.model, precision)
    tp_paths = plan.tp_sharded_paths()
    problems += [Problem(path=t.name, message="a tied embedding sharded over tp cannot share an "
                         "FSDP unit with parameters that are not", value=" = ".join(group),
                         fix="untie the embedding (tie_embeddings=False) or leave plan_fsdp out")
                 for group in plan.model.tied for t in [plan.model.tensor(group[0])]
                 if any(n.rpartition(".")[0] in tp_paths for n in group)]
    if problems:
        return Failure(PlanError(problems))
    param_dtype, reduce_dtype = _DTYPES[precision]
    spec, mesh_spec = plan.model, plan.mesh
    dense, sharded = dense_dp_dims(mesh_spec), tp_sharded_dp_dims(mesh_spec)

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
    units += [unit(p, dense) for p in (*spec.paths_with("block"), *spec.paths_with("mtp"))]
    # linears sharded over tp: units of their own on the data-parallel axes without tp (their
    # DTensors carry tp), inside the block's unit on every rank of the replica
    units += [unit(p, sharded) for p in tp_paths
              if not {"embed", "lm_head"} & set(spec.module(p).roles)]
    for role in ("embed", "lm_head"):
        for path in spec.paths_with(role):
            params = spec.params_under(path)
            dtypes = (_LM_HEAD_DTYPES[lm_head_precision] if role == "lm_head" and lm_head_precision
                      else (param_dtype, reduce_dtype))
            if params and all(len(spec.tie_of(t.name)) == 1 for t in params):
                # lm_head runs last in forward and first in backward: resharding it in
                # between would only all-gather it again at once
                units.append(evolve(unit(path, sharded if path in tp_paths else dense,
                                         dtypes=dtypes),
                                    reshard_after_forward=reshard_after_forward
                                    and role != "lm_head"))
    # the outer units (the backbone, the root) stay gathered through their whole forward
    # and are needed again as backward starts: resharding them in between only costs an
    # all-gather, never memory
    outer = [p for p in spec.paths_with("backbone") if p]
    if wrap_outer_model or not outer:
        outer.append("")
    units += [evolve(unit(p, dense), reshard_after_forward=False) for p in outer]
    # the last block (with its experts' units) runs last in forward and first in backward,
    # like lm_head: resharding it in between would only all-gather it again at once
    last = [*spec.paths_with("block"), *spec.paths_with("mtp")][-1:]
    units = [evolve(u, reshard_after_forward=False)
             if any(u.path == b or u.path.startswith(b + ".") for b in last) else u
             for u in units]
    if not shard_frozen:
        unsharded += [t.name for t in spec.tensors if not t.is_buffer and not t.requires_grad]
    units = [evolve(u, ignored=tuple(n for n in unsharded
                                     if u.path == "" or n.startswith(u.path + ".")))
             for u in units]
    placed, kept = place_kept(spec, [u for u in units if _has_params_left(spec, u)],
                              low_precision=param_dtype is not None)
    return Success(without_gradient_sync(plan).add_steps([*placed, *kept]))
