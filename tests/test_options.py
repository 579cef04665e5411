"""Stage options as records: a plan says how it was made, and making it again gives the same plan."""

from __future__ import annotations

import json
import re
import typing

import attrs
import pytest
import torch
from torch import nn

from moefn import (
    ACOptions,
    CPOptions,
    EPOptions,
    FSDPOptions,
    MeshSpec,
    PlanFormatError,
    ShardPlan,
    Stage,
    compose,
    from_json,
    plan_ac,
    plan_cp,
    plan_ep,
    plan_fsdp,
    stages_from,
    to_json,
)
from moefn.adapters.reference import MoETransformer, get_preset
from moefn.plan.errors import ArgumentTypeError

# every stage, and every option of each with a value other than its default
CASES: dict[str, tuple[str, tuple[Stage, ...], str, tuple[str, ...]]] = {
    "cp-all_gather": ("dp_shard=2,cp=2,ep=2", (plan_cp(seq_len=16), plan_ep(), plan_ac(),
                                               plan_fsdp()), "tiny", ()),
    "cp-p2p": ("dp_shard=2,cp=2,ep=2", (plan_cp(comm="p2p"), plan_ep(dispatch="all_gather"),
                                        plan_ac(mode="full"), plan_fsdp(precision="fp32")),
               "tiny-mla", ()),
    "ep-hierarchical": ("dp_shard=8,ep=4", (
        plan_ep(dispatch="hierarchical", ranks_per_node=2),
        plan_ac(mode="selective", skip=("layers.0",)),
        plan_fsdp(reshard_after_forward=False, offload=True, lm_head_precision="fp32")),
        "tiny-full", ()),
    "ac-none-fsdp-frozen": ("dp_shard=2", (plan_ac(mode="none"),
                                           plan_fsdp(wrap_outer_model=False, shard_frozen=True)),
                            "tiny", ("embed.weight",)),
    "ac-every-2": ("dp_shard=2", (plan_ac(every=2),), "tiny-full", ()),
    "hsdp-fp32-bf16-head": ("dp_replicate=2,dp_shard=2", (
        plan_fsdp(precision="fp32", lm_head_precision="bf16"),), "tiny", ()),
}
RECORDS = (CPOptions, EPOptions, ACOptions, FSDPOptions)


def model_of(preset: str, frozen: tuple[str, ...]) -> nn.Module:
    with torch.device("meta"):
        model = MoETransformer(get_preset(preset))
    for name in frozen:
        model.get_parameter(name).requires_grad_(False)
    return model


def planned(name: str) -> tuple[nn.Module, ShardPlan]:
    mesh, stages, preset, frozen = CASES[name]
    model = model_of(preset, frozen)
    return model, compose(*stages)(model, MeshSpec.parse(mesh)).unwrap()


def replanned(model: nn.Module, plan: ShardPlan) -> ShardPlan:
    return compose(*stages_from(plan.options))(model, plan.mesh).unwrap()


@pytest.mark.parametrize("name", list(CASES))
def test_a_plan_is_made_again_from_its_options(name: str) -> None:
    model, plan = planned(name)
    assert plan.options == tuple(s.options for s in CASES[name][1])
    assert stages_from(plan.options) == CASES[name][1]
    assert replanned(model, plan) == plan


@pytest.mark.parametrize("name", list(CASES))
def test_a_plan_read_from_json_is_made_again_from_its_options(name: str) -> None:
    model, plan = planned(name)
    text = to_json(plan)
    assert [o["record"] for o in json.loads(text)["plan"]["options"]] == [
        type(o).__name__ for o in plan.options]
    read = from_json(text)
    assert read == plan
    assert replanned(model, read) == plan


def literal_choices(tp: object) -> tuple[object, ...]:
    """The values a Literal type (or a union holding Literals) allows; () for other types."""
    if typing.get_origin(tp) is typing.Literal:
        return typing.get_args(tp)
    return tuple(c for arg in typing.get_args(tp) for c in literal_choices(arg))


def test_the_cases_cover_every_option_of_every_stage() -> None:
    """Each choice of a Literal option, and a value other than the default of every other."""
    used = [s.options for _, stages, _, _ in CASES.values() for s in stages]
    for record in RECORDS:
        hints = typing.get_type_hints(record)
        for field in attrs.fields(record):
            values = {getattr(o, field.name) for o in used if isinstance(o, record)}
            choices = set(literal_choices(hints[field.name]))
            missing = choices - values if choices else (
                set() if values - {field.default} else {"a value other than the default"})
            assert not missing, f"{record.__name__}.{field.name}: no case uses {missing}"


def test_equal_options_make_equal_stages_with_a_readable_repr() -> None:
    assert plan_ep() == plan_ep(dispatch="all_to_all")
    assert plan_ep() != plan_ep(dispatch="all_gather")
    assert hash(plan_ac(skip=["layers.0"])) == hash(plan_ac(skip=("layers.0",)))  # type: ignore[arg-type]
    assert repr(plan_ep(dispatch="hierarchical", ranks_per_node=8)) == (
        "Stage(options=EPOptions(dispatch='hierarchical', ranks_per_node=8), mesh=None)")


def test_a_version_1_file_still_reads_without_options() -> None:
    _, plan = planned("cp-all_gather")
    doc = json.loads(to_json(plan))
    del doc["plan"]["options"]
    doc["version"] = 1
    assert from_json(json.dumps(doc)) == attrs.evolve(plan, options=())


@pytest.mark.parametrize(("edit", "message"), [
    pytest.param(lambda d: d["plan"].pop("options"), "missing ['options']", id="missing"),
    pytest.param(lambda d: d["plan"]["options"].pop(), "options do not match the stages",
                 id="one-short"),
    pytest.param(lambda d: d["plan"]["options"].reverse(), "options do not match the stages",
                 id="out-of-order"),
    pytest.param(lambda d: d["plan"]["options"][1].update(dispatch="broadcast"),
                 "plan.options[1].dispatch: expected one of", id="unknown-dispatch"),
])
def test_a_version_2_file_with_wrong_options_is_refused(edit, message) -> None:  # type: ignore[no-untyped-def]
    _, plan = planned("cp-all_gather")
    doc = json.loads(to_json(plan))
    edit(doc)
    with pytest.raises(PlanFormatError, match=re.escape(message)):
        from_json(json.dumps(doc))


def test_stages_from_names_what_is_not_an_options_record() -> None:
    with pytest.raises(ArgumentTypeError, match=r"options\[1\].*stage options record"):
        stages_from((EPOptions(), ("fsdp", (("precision", "fp32"),))))  # type: ignore[arg-type]
