"""Multi-rank realize tests on real gloo ranks: parity with one process, atomicity, JSON plans."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from moefn import MeshSpec, RealizeError, ShardPlan, compose, plan_fsdp
from moefn.adapters.reference import MoETransformer, get_preset
from moefn.analyse.layout import param_layouts
from moefn.plan.options import FSDPOptions
from moefn.plan.records import DistributeParams, FullyShard, InstallDispatch, Shard
from moefn.plan.serialize import from_json, to_json
from moefn.realize import build_device_meshes, realize
from tests.parity import Case, assert_parity, run_parity
from tests.ranks import RankPool

FSDP32 = (FSDPOptions(precision="fp32"),)


@pytest.mark.parametrize(("world", "mesh", "preset"), [
    (2, "dp_shard=2", "tiny"),
    (4, "dp_shard=4", "tiny"),
    (4, "dp_shard=4", "tiny-full"),
])
def test_fsdp_matches_one_process(ranks: Callable[[int], RankPool], world: int, mesh: str,
                                  preset: str) -> None:
    results = ranks(world).run(run_parity, Case(mesh=mesh, stages=FSDP32, preset=preset))
    assert_parity(results[0])


def _state(model: nn.Module) -> dict[str, Any]:
    return {k: (v.clone(), v.dtype, v.device) for k, v in model.state_dict().items()}


def _realize_wrong_model(rank: int, world: int) -> dict[str, Any]:
    with torch.device("meta"):
        planned_for = MoETransformer(get_preset("tiny"))
    mesh = MeshSpec(dp_shard=world)
    plan = compose(plan_fsdp(precision="fp32"))(planned_for, mesh).unwrap()
    torch.manual_seed(0)
    other = MoETransformer(get_preset("tiny-full"))
    before, ids = _state(other), {k: id(v) for k, v in other.named_parameters()}
    outcome: dict[str, Any] = {}
    try:
        realize(plan, other, build_device_meshes(mesh, "cpu"))
    except RealizeError as err:
        outcome["error"] = str(err)
    after = _state(other)
    outcome["untouched"] = before.keys() == after.keys() and all(
        torch.equal(before[k][0], after[k][0]) and before[k][1:] == after[k][1:] for k in before)
    outcome["same_params"] = ids == {k: id(v) for k, v in other.named_parameters()}
    outcome["tie"] = other.lm_head.weight is other.embed.weight
    return outcome


def _realize_differing_plans(rank: int, world: int) -> str:
    """Rank 1 plans a different mesh axis layout: every rank must stop with the same error."""
    torch.manual_seed(0)
    model = MoETransformer(get_preset("tiny"))
    mesh = MeshSpec(dp_shard=world)
    precision = "bf16" if rank == 1 else "fp32"
    plan = compose(plan_fsdp(precision=precision))(model, mesh).unwrap()
    try:
        realize(plan, model, build_device_meshes(mesh, "cpu"))
    except RealizeError as err:
        return str(err)
    return "realized"


def test_realize_refuses_a_plan_for_another_model_and_leaves_it_untouched(
        ranks: Callable[[int], RankPool]) -> None:
    for outcome in ranks(2).run(_realize_wrong_model):
        assert "missing from the model" in outcome["error"] or "not in the plan" in outcome["error"]
        assert outcome["untouched"] and outcome["same_params"] and outcome["tie"]
    errors = ranks(2).run(_realize_differing_plans)
    assert all("different plans" in e for e in errors) and errors[0] == errors[1]


def _ep_style_plan(world: int) -> ShardPlan:
    """Hand-written: experts Shard(0) on ep, their own unit on ep_shard, dense units on dp."""
    with torch.device("meta"):
        model = MoETransformer(get_preset("tiny"))
    base = compose(plan_fsdp(precision="fp32", reshard_after_forward=False))(
        model, MeshSpec(dp_shard=world, ep=2)).unwrap()
    steps = []
    for path in base.model.paths_with("experts"):
        steps += [DistributeParams(stage="ep", path=path, params=("gate_up", "down"),
                                   mesh_dims=("ep",), placements=(Shard(0),)),
                  InstallDispatch(stage="ep", path=path, kind="all_to_all", mesh_dims=("ep",),
                                  num_experts=8),
                  FullyShard(stage="fsdp", path=path, mesh_dims=("ep_shard",), shard_dim=1,
                             reshard_after_forward=True)]
    return base.add_steps(steps)


def _realize_from_json(rank: int, world: int, text: str) -> list[str]:
    plan = from_json(text)
    torch.manual_seed(0)
    model = MoETransformer(get_preset("tiny"))
    realize(plan, model, build_device_meshes(plan.mesh, "cpu"))
    mismatches = []
    layouts = param_layouts(plan)
    for name, param in model.named_parameters():
        assert isinstance(param, DTensor), name
        layout = layouts[name]
        axes = tuple(a for a, _ in layout.shards)
        if tuple(param.device_mesh.mesh_dim_names or ()) != tuple(
                a for a in ("ep_shard", "ep", "dp_shard_cp") if a in axes):
            mismatches.append(f"{name}: mesh {param.device_mesh.mesh_dim_names} vs {axes}")
        shapes = {s for s, _ in layout.local_shapes(plan.mesh)}
        if tuple(param.to_local().shape) not in shapes:
            mismatches.append(f"{name}: local {tuple(param.to_local().shape)} vs {shapes}")
    modules = dict(model.named_modules())
    for unit in plan.steps_of(FullyShard):
        module = modules[unit.path]
        if not isinstance(module, FSDPModule):
            mismatches.append(f"{unit.path}: not an FSDP unit")
            continue
        group = module._get_fsdp_state()._fsdp_param_group
        assert group is not None
        if group.mesh_info.mesh.mesh_dim_names != unit.mesh_dims:
            mismatches.append(f"{unit.path}: mesh {group.mesh_info.mesh.mesh_dim_names}")
        if (group.post_forward_mesh_info is not None) != unit.reshard_after_forward:
            mismatches.append(f"{unit.path}: reshard_after_forward differs")
        if group.mp_policy.param_dtype is not None:
            mismatches.append(f"{unit.path}: param dtype {group.mp_policy.param_dtype}")
    return mismatches


def test_realize_from_json_follows_the_plan_exactly(ranks: Callable[[int], RankPool]) -> None:
    plan = _ep_style_plan(4)
    assert from_json(to_json(plan)) == plan
    for mismatches in ranks(4).run(_realize_from_json, to_json(plan)):
        assert mismatches == []
