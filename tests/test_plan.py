"""Offline plan tests: meta-device models, no process group."""

from __future__ import annotations

import json
from pathlib import Path

import attrs
import pytest
import torch
from returns.result import Failure

from moefn import (
    EPOptions,
    MeshSpec,
    PlanError,
    PlanFormatError,
    ShardPlan,
    Stage,
    compose,
    inspect_model,
    plan_ac,
    plan_cp,
    plan_ep,
    plan_fsdp,
)
from moefn.adapters.reference import MoETransformer, get_preset
from moefn.analyse.render import diff
from moefn.plan.records import ActivationCheckpoint, FullyShard
from moefn.plan.serialize import from_json, to_json

GOLDEN = Path(__file__).parent / "golden"


def meta_model(preset: str = "tiny") -> MoETransformer:
    with torch.device("meta"):
        return MoETransformer(get_preset(preset))


def problems_of(result: object) -> tuple[str, ...]:
    assert isinstance(result, Failure), result
    return tuple(p.message for p in result.failure().problems)


def test_mesh_layout_and_validation() -> None:
    mesh = MeshSpec.parse("dp_replicate=2,dp_shard=2,cp=2,ep=2")
    assert (mesh.world_size, mesh.ep_shard, mesh.size("dp_shard_cp")) == (8, 2, 4)
    # ep innermost: an EP group is a run of adjacent ranks
    assert [mesh.coordinate(r, "ep") for r in range(4)] == [0, 1, 0, 1]
    assert [mesh.coordinate(r, "dp_shard_cp") for r in range(8)] == [0, 1, 2, 3] * 2
    with pytest.raises(PlanError, match="ep must divide"):
        MeshSpec(dp_shard=3, ep=2)
    with pytest.raises(PlanError) as err:
        MeshSpec.parse("dp_shard=x,xp=2")
    assert len(err.value.problems) == 2
    with pytest.raises(PlanError, match="does not cover the world"):
        MeshSpec.parse("dp_shard=4", world_size=8)
    assert MeshSpec.parse(mesh.as_text()) == mesh


def test_compose_runs_left_to_right_and_records_stages() -> None:
    plan = compose(plan_ep(), plan_fsdp())(meta_model(), MeshSpec(dp_shard=4, ep=2)).unwrap()
    assert plan.stages == ("ep", "fsdp")
    # one stage at a time gives the same plan: stages are plain functions of the plan
    seeded = compose(plan_ep())(meta_model(), MeshSpec(dp_shard=4, ep=2)).unwrap()
    assert plan_fsdp()(seeded).unwrap() == plan


def test_out_of_order_stages_are_refused() -> None:
    result = compose(plan_fsdp(), plan_ep())(meta_model(), MeshSpec(dp_shard=4, ep=2))
    assert problems_of(result) == ("stages out of the canonical order",)
    fsdp_plan = compose(plan_fsdp())(meta_model(), MeshSpec(dp_shard=4, ep=2)).unwrap()
    assert problems_of(plan_ep()(fsdp_plan)) == ("stages out of the canonical order",)


def test_two_meshes_in_one_composition_are_refused() -> None:
    result = compose(plan_ep(mesh=MeshSpec(dp_shard=4, ep=2)), plan_fsdp())(
        meta_model(), MeshSpec(dp_shard=4, ep=4))
    assert problems_of(result) == ("two different meshes in one composition",)
    assert problems_of(compose(plan_fsdp())(meta_model())) == ("no mesh given",)


def test_every_problem_is_reported_at_once() -> None:
    result = compose(plan_ep(), plan_fsdp())(meta_model(), MeshSpec(dp_shard=3, ep=3))
    assert isinstance(result, Failure)
    problems = result.failure().problems
    assert [p.path for p in problems] == ["layers.0.mlp.experts", "layers.1.mlp.experts"]
    assert problems[0].value == "8 experts, ep=3" and "(1,)" in problems[0].fix


def test_cp_and_ac_refuse_bad_options_with_every_problem() -> None:
    result = compose(plan_cp(seq_len=30))(meta_model(), MeshSpec(dp_shard=2, cp=2))
    assert isinstance(result, Failure)
    (problem,) = result.failure().problems
    assert problem.value == "seq_len=30, cp=2" and problem.fix == "use seq_len 28 or 32"
    assert problems_of(compose(plan_cp())(meta_model(), MeshSpec(dp_shard=2))) == (
        "plan_cp needs a cp axis larger than 1",)
    result = compose(plan_ac(mode="sometimes", skip=("blocks.*",), every=0))(  # type: ignore[arg-type]
        meta_model(), MeshSpec(dp_shard=2))
    assert problems_of(result) == ("unknown checkpoint mode", "every must be at least 1",
                                   "skip pattern matches no block")


def test_ac_plan_records_mode_saves_and_opt_outs() -> None:
    plan = compose(plan_ac(mode="router", skip=("layers.1",)))(
        meta_model("tiny-full"), MeshSpec(dp_shard=2)).unwrap()
    steps = {s.path: s for s in plan.steps_of(ActivationCheckpoint)}
    assert set(steps) == {"layers.0", "layers.2", "mtp"}
    assert steps["mtp"].saves == ("router top-k (replayed on recompute)",)
    every = compose(plan_ac(mode="full", every=2))(meta_model("tiny-full"), MeshSpec()).unwrap()
    assert [s.path for s in every.steps_of(ActivationCheckpoint)] == ["layers.0", "layers.2", "mtp"]


def test_planning_never_mutates_the_model() -> None:
    torch.manual_seed(0)
    model = MoETransformer(get_preset("tiny"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = {k: id(v) for k, v in model.named_parameters()}
    compose(plan_ep(), plan_fsdp())(model, MeshSpec(dp_shard=4, ep=2)).unwrap()
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert params == {k: id(v) for k, v in model.named_parameters()}


def test_records_are_frozen_and_hashable() -> None:
    plan = compose(plan_fsdp())(meta_model(), MeshSpec(dp_shard=2)).unwrap()
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        plan.steps = ()  # type: ignore[misc]
    assert hash(plan) == hash(compose(plan_fsdp())(meta_model(), MeshSpec(dp_shard=2)).unwrap())


def test_fsdp_units_cover_blocks_experts_embeddings_and_root() -> None:
    plan = compose(plan_ep(), plan_fsdp())(meta_model(), MeshSpec(dp_shard=4, ep=2)).unwrap()
    units = {s.path: s for s in plan.steps_of(FullyShard)}
    assert set(units) == {"", "embed", "lm_head", "layers.0", "layers.1",
                          "layers.0.mlp.experts", "layers.1.mlp.experts"}
    assert units["layers.0.mlp.experts"].mesh_dims == ("ep_shard",)
    assert units["layers.0"].mesh_dims == ("dp_shard_cp",)
    assert (units[""].param_dtype, units[""].reduce_dtype) == ("bfloat16", "float32")


def test_tied_embeddings_stay_with_the_root_and_fp32_router_gets_its_own_unit() -> None:
    plan = compose(plan_fsdp())(meta_model("tiny-full"), MeshSpec(dp_shard=2)).unwrap()
    units = {s.path: s for s in plan.steps_of(FullyShard)}
    assert "embed" not in units and "lm_head" not in units
    assert units["mtp"].mesh_dims == ("dp_shard_cp",)
    routers = [p for p in units if p.endswith("router")]
    assert routers and all(units[p].param_dtype == "float32" for p in routers)


def test_experts_shard_on_dim_one_when_shards_outnumber_local_experts() -> None:
    mesh = MeshSpec(dp_shard=16, ep=2)  # 4 local experts, ep_shard = 8 divides dim 1 (16, 32)
    plan = compose(plan_ep(), plan_fsdp())(meta_model(), mesh).unwrap()
    experts = [s for s in plan.steps_of(FullyShard) if s.path.endswith("experts")]
    assert experts and all(s.shard_dim == 1 for s in experts)
    # ep_shard = 32 does not divide down's dim 1 (16): FSDP2 would refuse, so dim 0
    plan = compose(plan_ep(), plan_fsdp())(meta_model(), MeshSpec(dp_shard=64, ep=2)).unwrap()
    assert all(s.shard_dim == 0 for s in plan.steps_of(FullyShard) if s.path.endswith("experts"))


def test_json_round_trip_is_identity() -> None:
    plan = compose(plan_ep(dispatch="all_gather"), plan_fsdp())(
        meta_model("tiny-full"), MeshSpec(dp_replicate=2, dp_shard=2, ep=2)).unwrap()
    text = to_json(plan)
    assert from_json(text) == plan
    doc = json.loads(text)
    assert doc["version"] == 3 and doc["format"] == "moefn.plan"


def test_activation_checkpoints_keep_their_json_name() -> None:
    plan = compose(plan_ac(mode="full"))(meta_model(), MeshSpec(dp_shard=2)).unwrap()
    doc = json.loads(to_json(plan))
    assert {s["record"] for s in doc["plan"]["steps"]} == {"Checkpoint"}
    # a plan file written before the record was named ActivationCheckpoint
    doc["plan"]["steps"] = [{"record": "Checkpoint", "stage": "ac", "path": "layers.0",
                             "mode": "full", "saves": []}]
    assert from_json(json.dumps(doc)).steps == (
        ActivationCheckpoint(stage="ac", path="layers.0", mode="full"),)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: "not json", "not valid JSON"),
        (lambda d: {**d, "version": 99}, "unsupported plan format version"),
        (lambda d: {**d, "format": "pickle"}, "not a moefn plan"),
    ],
)
def test_bad_plan_files_are_refused(mutate, message) -> None:  # type: ignore[no-untyped-def]
    doc = json.loads(to_json(compose(plan_fsdp())(meta_model(), MeshSpec(dp_shard=2)).unwrap()))
    bad = mutate(doc)
    with pytest.raises(PlanFormatError, match=message):
        from_json(bad if isinstance(bad, str) else json.dumps(bad))


def test_plan_file_with_unexpected_types_names_the_field() -> None:
    doc = json.loads(to_json(compose(plan_fsdp())(meta_model(), MeshSpec(dp_shard=2)).unwrap()))
    doc["plan"]["steps"][0]["shard_dim"] = "0"
    with pytest.raises(PlanFormatError) as err:
        from_json(json.dumps(doc))
    assert err.value.problems[0].path == "plan.steps[0].shard_dim"
    doc["plan"]["steps"][0]["record"] = "os.system"
    with pytest.raises(PlanFormatError):
        from_json(json.dumps(doc))


def test_golden_diff() -> None:
    plan = compose(plan_ep(), plan_fsdp(precision="fp32"))(
        meta_model(), MeshSpec(dp_shard=4, ep=2)).unwrap()
    golden = GOLDEN / "tiny_ep2_fsdp4.txt"
    assert diff(plan) == golden.read_text().rstrip("\n")


def test_full_size_plan_shows_expert_local_shapes() -> None:
    plan = compose(plan_ep(), plan_fsdp())(
        meta_model("deepseek-v3"), MeshSpec(dp_shard=1024, ep=64)).unwrap()
    text = diff(plan)
    assert "layers.*.mlp.experts.gate_up ×58" in text
    assert "[4, 448, 4096]×1024 ranks" in text  # 256/64 experts, dim 1 over ep_shard=16
    dp_steps = [s for s in plan.steps_of(FullyShard) if s.path.startswith("layers.")]
    assert len(dp_steps) == 61 + 58 + 58  # blocks, experts, fp32 routers


def test_readme_quickstart_runs_verbatim() -> None:
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    block = readme.split("```python\n", 1)[1].split("```", 1)[0]
    exec(compile(block, "README.md", "exec"), {})


@pytest.mark.parametrize("helper", ["ModuleInfo.fact", "ModelSpec.module", "MeshSpec.size"])
def test_a_helper_raising_plan_error_inside_a_stage_is_a_failure(helper: str) -> None:
    """One error channel: what a helper raises while a stage runs comes back as a Failure."""
    plan = ShardPlan.empty(inspect_model(meta_model()), MeshSpec(dp_shard=4, ep=2))
    experts = plan.model.module("layers.0.mlp.experts")
    calls = {
        "ModuleInfo.fact": lambda: experts.fact("no_such_fact"),
        "ModelSpec.module": lambda: plan.model.module("no.such.module"),
        "MeshSpec.size": lambda: plan.mesh.size("no_such_axis"),  # type: ignore[arg-type]
    }

    def run(options: EPOptions, p: ShardPlan) -> object:
        calls[helper]()
        raise AssertionError("the helper should have raised")

    result = Stage(options=EPOptions(), run=run)(plan)
    assert isinstance(result, Failure) and isinstance(result.failure(), PlanError)
