"""FSDP2 options on real gloo ranks: HSDP, reshard, offload, ties, precision, frozen modules."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from moefn import MeshSpec, compose, plan_fsdp
from moefn.adapters.reference import causal_lm_loss
from moefn.plan.options import ACOptions, CPOptions, EPOptions, FSDPOptions
from moefn.plan.records import FullyShard
from moefn.train.loop import global_batch, local_batch
from tests.parity import Case, assert_parity, build_pair, run_parity
from tests.ranks import RankPool


def fsdp(**options: Any) -> tuple[FSDPOptions, ...]:
    return (FSDPOptions(**{"precision": "fp32", **options}),)


CASES = [
    ("hsdp-2x2", "dp_replicate=2,dp_shard=2", fsdp(), "tiny", ()),
    ("reshard-off", "dp_shard=4", fsdp(reshard_after_forward=False), "tiny", ()),
    ("offload", "dp_shard=4", fsdp(offload=True), "tiny", ()),
    ("tied-mtp-dense", "dp_shard=4", fsdp(), "tiny-full", ()),
    ("no-outer-root", "dp_shard=4", fsdp(wrap_outer_model=False), "tiny", ()),
    ("frozen-embedding", "dp_shard=4", fsdp(), "tiny", ("embed.weight",)),
]


@pytest.mark.parametrize(("mesh", "stages", "preset", "freeze"), [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_fsdp_options_match_one_process(ranks: Callable[[int], RankPool], mesh: str,
                                        stages: Any, preset: str, freeze: Any) -> None:
    case = Case(mesh=mesh, stages=stages, preset=preset, freeze=freeze)
    assert_parity(ranks(4).run(run_parity, case)[0])


def test_bf16_keeps_fp32_master_weights(ranks: Callable[[int], RankPool]) -> None:
    case = Case(mesh="dp_shard=4", stages=fsdp(precision="bf16", lm_head_precision="fp32"),
                preset="tiny-full")
    result = ranks(4).run(run_parity, case)[0]
    assert result["master_dtypes"] == {"torch.float32"}
    assert result["max_loss_diff"] <= 2e-2  # bf16 parameters in compute, fp32 reduction
    assert result["max_loss_diff"] > 0  # bf16 really was used


def _tie_and_units(rank: int, world: int) -> dict[str, Any]:
    case = Case(mesh="dp_shard=4", stages=fsdp(precision="bf16"), preset="tiny-full",
                freeze=())
    reference, model, plan = build_pair(case)
    tied_after_realize = model.lm_head.weight is model.embed.weight
    batch = global_batch(reference.config, 4, 16, 0)
    mine = local_batch(batch, plan.mesh, rank)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    causal_lm_loss(model(mine.input_ids, mine.position_ids), mine.labels,
                   batch.num_valid).backward()
    optimizer.step()
    modules = dict(model.named_modules())
    policies = {}
    for unit in plan.steps_of(FullyShard):
        module = modules[unit.path]
        assert isinstance(module, FSDPModule)
        group = module._get_fsdp_state()._fsdp_param_group
        assert group is not None
        policies[unit.path] = (str(group.mp_policy.param_dtype), unit.param_dtype)
    return {"tied": (tied_after_realize, model.lm_head.weight is model.embed.weight),
            "embed_is_dtensor": isinstance(model.embed.weight, DTensor), "policies": policies}


def test_ties_hold_and_units_apply_the_planned_precision(ranks: Callable[[int], RankPool]) -> None:
    result = ranks(4).run(_tie_and_units)[0]
    assert result["tied"] == (True, True) and result["embed_is_dtensor"]
    for path, (applied, planned) in result["policies"].items():
        assert applied == f"torch.{planned}", path
    routers = [p for p in result["policies"] if p.endswith("router")]
    assert routers and all(result["policies"][p][1] == "float32" for p in routers)


def test_frozen_modules_get_no_unit_unless_asked() -> None:
    from tests.test_plan import meta_model

    model = meta_model()
    model.embed.weight.requires_grad_(False)
    units = {s.path: s for s in compose(plan_fsdp())(model, MeshSpec(dp_shard=2)).unwrap()
             .steps_of(FullyShard)}
    assert "embed" not in units and units[""].ignored == ("embed.weight",)
    asked = compose(plan_fsdp(shard_frozen=True))(model, MeshSpec(dp_shard=2)).unwrap()
    assert "embed" in {s.path for s in asked.steps_of(FullyShard)}


@pytest.mark.parametrize("dispatch", ["all_to_all", "all_gather"])
def test_bf16_with_every_stage(ranks: Callable[[int], RankPool], dispatch: str) -> None:
    stages = (CPOptions(), EPOptions(dispatch=dispatch), ACOptions(mode="router"),
              FSDPOptions(precision="bf16"))
    result = ranks(4).run(run_parity, Case(mesh="dp_shard=2,cp=2,ep=2", stages=stages,
                                           preset="tiny-full"))[0]
    assert result["master_dtypes"] == {"torch.float32"}
    assert 0 < result["max_loss_diff"] <= 2e-2
