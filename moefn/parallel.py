"""One call from a model to a parallel model: plan the stages asked for, then realize.

For people moving from NeMo AutoModel's ``parallelize_model``: docs/migration.md maps each of its
arguments. Each stage argument is that stage's options record (`CPOptions`, `EPOptions`,
`TPOptions`, `ACOptions`, `FSDPOptions`: the stage is planned with them) or None (the stage is
left out); the stages run in the order CP → TP → EP → AC → FSDP, as
`compose(*stages_from(records))` does. With ``tp`` the logits are vocabulary-sharded: compute
the loss under ``torch.distributed.tensor.parallel.loss_parallel()``.
Nothing changes unless every stage plans and every rank agrees.

>>> import torch
>>> from moefn import ACOptions, EPOptions, FSDPOptions, MeshSpec
>>> from moefn.adapters.reference import MoETransformer, get_preset
>>> from moefn.launch import fake_world
>>> from moefn.realize import build_device_meshes
>>> with torch.device("meta"):
...     model = MoETransformer(get_preset("tiny"))
>>> with fake_world(4):  # torch's fake process group: rank 0 of 4, no communication
...     model, plan = parallelize(model, build_device_meshes(MeshSpec(dp_shard=4, ep=2), "cpu"),
...                               ep=EPOptions(), ac=ACOptions(mode="router"), fsdp=FSDPOptions())
>>> plan.stages
('ep', 'ac', 'fsdp')
"""

from __future__ import annotations

from torch import nn

from moefn.plan.arguments import expect_type
from moefn.plan.compose import compose, plan_or_raise
from moefn.plan.errors import PlanError
from moefn.plan.options import (
    ACOptions,
    CPOptions,
    EPOptions,
    FSDPOptions,
    StageOptions,
    TPOptions,
)
from moefn.plan.records import ShardPlan
from moefn.plan.stages import stages_from
from moefn.realize import DeviceMeshes, realize


def parallelize(model: nn.Module, meshes: DeviceMeshes, *, cp: CPOptions | None = None,
                tp: TPOptions | None = None, ep: EPOptions | None = None,
                ac: ACOptions | None = None,
                fsdp: FSDPOptions | None = None) -> tuple[nn.Module, ShardPlan]:
    """Plan the stages given options (CP → TP → EP → AC → FSDP) for ``meshes.spec``, realize the
    plan on ``model``, in place.

    Returns the model and its plan (print ``moefn.diff(plan)``; estimate memory from it). Raises
    PlanError (nothing planned) or RealizeError (the model untouched) naming every problem."""
    expect_type(model, nn.Module, "model", "an nn.Module", "pass the model to parallelize")
    expect_type(meshes, DeviceMeshes, "meshes", "DeviceMeshes",
                'pass build_device_meshes(MeshSpec(...), "cuda")')
    given: dict[str, tuple[StageOptions | None, type]] = {
        "cp": (cp, CPOptions), "tp": (tp, TPOptions), "ep": (ep, EPOptions), "ac": (ac, ACOptions),
        "fsdp": (fsdp, FSDPOptions)}
    for name, (record, kind) in given.items():
        expect_type(record, (kind, type(None)), name, f"{kind.__name__} or None",
                    f"pass {name}={kind.__name__}(...) or leave {name} out")
    records = [record for record, _ in given.values() if record is not None]
    if not records:
        raise PlanError.single("parallelize", "no stage asked for", "cp, tp, ep, ac, fsdp all None",
                               "pass the options of at least one stage, e.g. "
                               "fsdp=FSDPOptions()")
    plan = plan_or_raise(compose(*stages_from(records))(model, meshes.spec))
    return realize(plan, model, meshes), plan


__all__ = ["parallelize"]
