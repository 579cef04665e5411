"""`moefn.parallelize`: one call that plans the stages given options records and realizes them."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from moefn import (
    ACOptions,
    CPOptions,
    EPOptions,
    FSDPOptions,
    MeshSpec,
    PlanError,
    TPOptions,
    compose,
    launch,
    parallelize,
    to_json,
)
from moefn.adapters.reference import MoETransformer, get_preset
from moefn.demo import DemoOptions, demo_mesh, demo_rows, demo_stages
from moefn.plan.errors import ArgumentTypeError
from moefn.realize import DeviceMeshes, build_device_meshes, realize
from moefn.train.loop import global_batch, local_batch, train
from tests.ranks import RankPool

OPTIONS = DemoOptions(steps=3)


def _demo_losses(rank: int, world: int) -> dict[str, Any]:
    """The demo's model and stages, once through compose + realize, once through parallelize."""
    mesh = demo_mesh(world)
    config = get_preset(OPTIONS.preset)
    batch = global_batch(config, demo_rows(OPTIONS, mesh), OPTIONS.seq, OPTIONS.seed)
    mine = local_batch(batch, mesh, rank)
    out: dict[str, Any] = {}
    for way in ("compose", "parallelize"):
        torch.manual_seed(OPTIONS.seed)
        model = MoETransformer(config)
        meshes = build_device_meshes(mesh, "cpu")
        if way == "compose":
            plan = compose(*demo_stages(mesh, OPTIONS))(model, mesh).unwrap()
            realize(plan, model, meshes)
        else:
            model, plan = parallelize(model, meshes, cp=CPOptions(seq_len=OPTIONS.seq),
                                      ep=EPOptions(), ac=ACOptions(mode="router"),
                                      fsdp=FSDPOptions(precision="fp32"))
        out[way] = (to_json(plan), train(model, mine, batch.num_valid, OPTIONS.steps,
                                          OPTIONS.lr))
    return out


def test_parallelize_trains_the_demo_like_compose_and_realize(
        ranks: Callable[[int], RankPool]) -> None:
    for per_rank in ranks(4).run(_demo_losses):
        (plan_a, losses_a), (plan_b, losses_b) = per_rank["compose"], per_rank["parallelize"]
        assert plan_a == plan_b  # the demo's stages, options and steps
        assert losses_a == losses_b and len(losses_a) == OPTIONS.steps
        assert losses_a[-1] < losses_a[0]


@pytest.fixture
def fake_world() -> Iterator[Callable[[MeshSpec], DeviceMeshes]]:
    """Device meshes on torch's fake process group (rank 0 of the mesh's world)."""
    with ExitStack() as stack:
        def meshes(spec: MeshSpec) -> DeviceMeshes:
            stack.enter_context(launch.fake_world(spec.world_size))
            return build_device_meshes(spec, "cpu")

        yield meshes


def _meta(preset: str = "tiny") -> nn.Module:
    with torch.device("meta"):
        return MoETransformer(get_preset(preset))


@pytest.mark.parametrize(("mesh", "choices", "stages"), [
    ("dp_shard=4,ep=2", {"ep": EPOptions(), "fsdp": FSDPOptions()}, ("ep", "fsdp")),
    ("dp_shard=2,cp=2", {"fsdp": FSDPOptions(), "cp": CPOptions()}, ("cp", "fsdp")),
    ("dp_shard=4,ep=2", {"ac": ACOptions(mode="full"), "ep": EPOptions(dispatch="all_gather")},
     ("ep", "ac")),
    ("dp_shard=4,ep=2", {"fsdp": FSDPOptions(), "ac": ACOptions(), "ep": EPOptions()},
     ("ep", "ac", "fsdp")),
    ("dp_shard=2,tp=2,ep=2", {"fsdp": FSDPOptions(), "ep": EPOptions(), "tp": TPOptions()},
     ("tp", "ep", "fsdp")),
])
def test_each_record_plans_its_stage_in_stage_order(
        fake_world: Callable[[MeshSpec], DeviceMeshes], mesh: str, choices: dict[str, Any],
        stages: tuple[str, ...]) -> None:
    _, plan = parallelize(_meta(), fake_world(MeshSpec.parse(mesh)), **choices)
    assert plan.stages == stages
    assert plan.options == tuple(sorted(choices.values(), key=lambda o: stages.index(o.stage)))


@pytest.mark.parametrize(("choices", "error", "words"), [
    ({"ep": {"dispatch": "all_gather"}}, ArgumentTypeError,
     ("ep", "expected EPOptions or None", "{'dispatch': 'all_gather'}", "ep=EPOptions(...)")),
    ({"fsdp": True}, ArgumentTypeError, ("fsdp", "True", "fsdp=FSDPOptions(...)")),
    ({"tp": 2}, ArgumentTypeError, ("tp", "expected TPOptions or None", "tp=TPOptions(...)")),
    ({"ac": ACOptions(mode="sometimes")}, PlanError,  # type: ignore[arg-type]
     ("unknown checkpoint mode", "'sometimes'")),
    ({"ep": EPOptions(dispatch="broadcast")}, PlanError,  # type: ignore[arg-type]
     ("unknown dispatch", "'broadcast'")),
    ({"cp": CPOptions()}, PlanError, ("cp",)),  # the mesh has no cp axis: plan_cp says why
    ({}, PlanError, ("no stage asked for", "fsdp=FSDPOptions()")),
])
def test_bad_choices_are_refused_and_leave_the_model_untouched(
        fake_world: Callable[[MeshSpec], DeviceMeshes], choices: dict[str, Any],
        error: type[Exception], words: tuple[str, ...]) -> None:
    model = _meta()
    before = {n: (type(p), p.shape) for n, p in model.named_parameters()}
    with pytest.raises(error) as raised:
        parallelize(model, fake_world(MeshSpec(dp_shard=4, ep=2)), **choices)
    assert all(word in str(raised.value) for word in words), str(raised.value)
    assert {n: (type(p), p.shape) for n, p in model.named_parameters()} == before


def test_meshes_must_be_device_meshes() -> None:
    with pytest.raises(ArgumentTypeError, match="build_device_meshes"):
        parallelize(_meta(), MeshSpec(dp_shard=4, ep=2), fsdp=FSDPOptions())  # type: ignore[arg-type]


REFERENCE_ARGUMENTS = (  # nemo_automodel.components.moe.parallelizer.parallelize_model
    "model", "world_mesh", "moe_mesh", "dp_axis_names", "cp_axis_name", "tp_axis_name",
    "ep_axis_name", "ep_shard_axis_names", "activation_checkpointing", "ignore_router_for_ac",
    "reshard_after_forward", "lm_head_precision", "wrap_outer_model", "mp_policy")


def test_the_migration_table_maps_every_reference_argument() -> None:
    text = (Path(__file__).parents[1] / "docs" / "migration.md").read_text()
    rows = [line.split("|")[1].strip() for line in text.splitlines() if line.startswith("| `")]
    assert rows[1:] == [f"`{name}`" for name in REFERENCE_ARGUMENTS]  # after the header
