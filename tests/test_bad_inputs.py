"""A corpus of bad inputs: each must end in a PlanError (or its RealizeError / PlanFormatError
subclasses) that names the path, the value and the fix — never a bare assert, KeyError, TypeError
or a hang — and a refused `realize` must leave the model exactly as it was (atomic realize).

Single-process cases plan meta-device models; multi-rank cases run in one call on the 4-rank
pool (every rank must raise the same RealizeError).
"""

from __future__ import annotations

import functools
import json
import os
import pickle
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from attrs import evolve, frozen
from returns.result import Failure
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.distributed.tensor import Shard as DShard

from moefn import (
    MeshSpec,
    PlanError,
    PlanFormatError,
    RealizeError,
    ShardPlan,
    compose,
    plan_ac,
    plan_cp,
    plan_ep,
    plan_fsdp,
)
from moefn.adapters.reference import MoETransformer, get_preset, make_batch
from moefn.analyse.render import diff
from moefn.launch import fake_world
from moefn.plan.serialize import from_json, to_json
from moefn.realize import DeviceMeshes, build_device_meshes, realize
from moefn.realize.dispatch import LocalDispatch
from tests.ranks import RankPool, release_groups

WORLD = 4
SENTINEL = Path(tempfile.gettempdir()) / f"moefn-smuggled-{os.getpid()}"


# ---------------------------------------------------------------------------------------------
# What an error must say
# ---------------------------------------------------------------------------------------------


@frozen
class Expect:
    """The problem the error must contain: exact path, substrings of message, value and fix."""

    error: type[PlanError]
    path: str
    message: str
    value: str
    fix: str


def check_error(err: object, expect: Expect) -> None:
    assert isinstance(err, expect.error), f"expected {expect.error.__name__}, got {err!r}"
    assert isinstance(err, PlanError) and err.problems
    for p in err.problems:  # every problem is meaningful, not only the one we look for
        assert isinstance(p.path, str), p
        assert p.message.strip() and p.value.strip() and p.fix.strip(), p
        assert p.fix != p.value and len(p.fix) > 8, p
    matching = [p for p in err.problems if p.path == expect.path and expect.message in p.message
                and expect.value in p.value and expect.fix in p.fix]
    assert matching, f"no problem like {expect} in:\n{err}"
    assert expect.value in str(err) and expect.fix in str(err)


def error_of(thunk: Callable[[], object]) -> PlanError:
    """The PlanError a call raises or returns as a Failure; anything accepted fails the test."""
    try:
        outcome = thunk()
    except PlanError as err:
        return err
    if isinstance(outcome, Failure):
        failure = outcome.failure()
        assert isinstance(failure, PlanError), failure
        return failure
    raise AssertionError(f"bad input accepted: {outcome!r}"[:400])


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------


@functools.cache
def meta(preset: str = "tiny", **changes: Any) -> MoETransformer:
    config = get_preset(preset)
    with torch.device("meta"):
        return MoETransformer(evolve(config, **changes) if changes else config)


TWO = MeshSpec(dp_shard=2)
EP2 = MeshSpec(dp_shard=WORLD, ep=2)


@functools.cache
def fsdp_plan() -> ShardPlan:
    return compose(plan_fsdp())(meta(), TWO).unwrap()


@functools.cache
def plan_text(preset: str = "tiny-full", mesh: MeshSpec = EP2) -> str:
    return to_json(compose(plan_ep(), plan_fsdp(precision="fp32"))(meta(preset), mesh).unwrap())


def step_of(doc: dict[str, Any], record: str, path: str) -> dict[str, Any]:
    steps = doc["plan"]["steps"]
    found = [s for s in steps if s["record"] == record and s["path"] == path]
    assert len(found) == 1, (record, path)
    result: dict[str, Any] = found[0]
    return result


def edited(edit: Callable[[dict[str, Any]], object], base: str | None = None) -> str:
    """The JSON of a valid plan after ``edit`` changed its parsed document in place."""
    doc = json.loads(plan_text() if base is None else base)
    edit(doc)
    return json.dumps(doc)


def load(text: str | bytes) -> Callable[[], object]:
    return lambda: from_json(text)  # type: ignore[arg-type]


class _Smuggler:
    """Pickles to a call of os.system: loading it with pickle would create SENTINEL."""

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (os.system, (f"touch {SENTINEL}",))


PICKLE_PAYLOAD = pickle.dumps(_Smuggler())
CODE = f"__import__('os').system('touch {SENTINEL}')"

FORMAT_FIX = "regenerate the plan with moefn"


def _set(target: dict[str, Any], **values: Any) -> None:
    target.update(values)


# (id, call, expected problem)
OFFLINE: list[tuple[str, Callable[[], object], Expect]] = [
    # --- meshes ---
    ("experts-not-divisible-by-ep", lambda: compose(plan_ep())(meta(), MeshSpec(dp_shard=3, ep=3)),
     Expect(PlanError, "layers.0.mlp.experts", "not divisible by ep", "8 experts, ep=3",
            "use ep in (1,)")),
    ("two-experts-ep4", lambda: compose(plan_ep())(meta("tiny-2experts"),
                                                   MeshSpec(dp_shard=4, ep=4)),
     Expect(PlanError, "layers.1.mlp.experts", "not divisible by ep", "2 experts, ep=4",
            "use ep in (1, 2)")),
    ("ep-larger-than-world", lambda: MeshSpec(dp_shard=2, ep=4),
     Expect(PlanError, "mesh", "ep must divide", "ep=4, dp_shard×cp×tp=2", "use ep in (1, 2)")),
    ("ep-larger-than-world-parsed", lambda: MeshSpec.parse("dp_shard=2,ep=4", world_size=2),
     Expect(PlanError, "mesh", "ep must divide", "ep=4", "use ep in (1, 2)")),
    ("axis-zero", lambda: MeshSpec(dp_shard=0),
     Expect(PlanError, "mesh", "dp_shard must be a positive integer", "0", "dp_shard=1 or larger")),
    ("axis-negative", lambda: MeshSpec(cp=-2),
     Expect(PlanError, "mesh", "cp must be a positive integer", "-2", "cp=1 or larger")),
    ("parsed-axis-zero", lambda: MeshSpec.parse("dp_shard=4,ep=0"),
     Expect(PlanError, "mesh", "ep must be a positive integer", "0", "ep=1 or larger")),
    ("parsed-axis-negative", lambda: MeshSpec.parse("dp_shard=-2"),
     Expect(PlanError, "mesh", "not an axis=size item", "'dp_shard=-2'", "axis=size")),
    ("parsed-axis-unknown", lambda: MeshSpec.parse("dp_shard=2,pp=2"),
     Expect(PlanError, "mesh", "not an axis=size item", "'pp=2'", "dp_replicate")),
    ("parsed-axis-without-size", lambda: MeshSpec.parse("dp_shard"),
     Expect(PlanError, "mesh", "not an axis=size item", "'dp_shard'", "axis=size")),
    ("parsed-derived-axis", lambda: MeshSpec.parse("ep_shard=2"),
     Expect(PlanError, "mesh", "not an axis=size item", "'ep_shard=2'", "axis=size")),
    ("parsed-axis-twice", lambda: MeshSpec.parse("dp_shard=2,dp_shard=4"),
     Expect(PlanError, "mesh", "dp_shard given twice", "dp_shard=2,dp_shard=4", "each axis once")),
    ("mesh-smaller-than-world", lambda: MeshSpec.parse("dp_shard=4", world_size=8),
     Expect(PlanError, "mesh", "does not cover the world", "4 ranks in the mesh, world size 8",
            "equal the world size")),
    ("mesh-larger-than-world", lambda: MeshSpec.parse("dp_shard=4,cp=2", world_size=4),
     Expect(PlanError, "mesh", "does not cover the world", "8 ranks in the mesh, world size 4",
            "equal the world size")),
    ("unknown-axis-size", lambda: MeshSpec(dp_shard=2).size("pp"),
     Expect(PlanError, "mesh", "unknown mesh axis", "'pp'", "dp_shard_cp")),
    ("axis-size-as-text", lambda: MeshSpec(dp_shard="2"),  # type: ignore[arg-type]
     Expect(PlanError, "mesh", "dp_shard must be a positive integer", "2", "dp_shard=")),
    ("axis-size-as-float", lambda: MeshSpec(dp_shard=2.0),  # type: ignore[arg-type]
     Expect(PlanError, "mesh", "dp_shard must be a positive integer", "2.0", "dp_shard=")),
    ("parsed-non-ascii-digit", lambda: MeshSpec.parse("dp_shard=²"),
     Expect(PlanError, "mesh", "not an axis=size item", "'dp_shard=²'", "axis=size")),
    ("mesh-given-as-text", lambda: compose(plan_fsdp())(meta(), "dp_shard=2"),  # type: ignore[arg-type]
     Expect(PlanError, "mesh", "", "dp_shard=2", "MeshSpec")),
    ("device-type-gpu", lambda: meshes_on("gpu"),
     Expect(RealizeError, "device_type", "not a torch device type", "'gpu'", '"cuda"')),
    ("device-with-index", lambda: meshes_on("cuda:0"),
     Expect(RealizeError, "device_type", "a device, not a device type", "'cuda:0'", "'cuda'")),
    ("device-absent", lambda: meshes_on("cuda") if not torch.cuda.is_available() else meshes_on("xpu"),
     Expect(RealizeError, "device_type", "no such device in this process", "", "is_available()")),
    ("device-meta", lambda: meshes_on("meta"),
     Expect(RealizeError, "device_type", "meta tensors cannot communicate", "'meta'", "fake_world")),
    # --- context parallel ---
    ("cp-not-dividing-sequence", lambda: compose(plan_cp(seq_len=30))(meta(), MeshSpec(cp=2)),
     Expect(PlanError, "plan_cp", "not divisible by 2·cp", "seq_len=30, cp=2", "use seq_len 28 or 32")),
    ("cp-sequence-too-short", lambda: compose(plan_cp(seq_len=6))(meta(), MeshSpec(cp=4)),
     Expect(PlanError, "plan_cp", "not divisible by 2·cp", "seq_len=6, cp=4", "use seq_len 8")),
    ("cp-sequence-zero", lambda: compose(plan_cp(seq_len=0))(meta(), MeshSpec(cp=2)),
     Expect(PlanError, "plan_cp", "sequence length", "seq_len=0", "seq_len")),
    ("plan-cp-with-cp-1", lambda: compose(plan_cp())(meta(), TWO),
     Expect(PlanError, "mesh", "needs a cp axis larger than 1", "cp=1", "leave plan_cp out")),
    # --- expert parallel ---
    ("plan-ep-with-ep-1", lambda: compose(plan_ep())(meta(), TWO),
     Expect(PlanError, "mesh", "needs an ep axis larger than 1", "ep=1", "leave plan_ep out")),
    ("ep-on-all-dense-model", lambda: compose(plan_ep())(
        meta(n_dense_layers=2, dense_intermediate=64), MeshSpec(dp_shard=2, ep=2)),
     Expect(PlanError, "", "no MoE experts", "MoETransformer", "leave plan_ep out")),
    ("unknown-dispatch", lambda: compose(plan_ep(dispatch="nccl"))(  # type: ignore[arg-type]
        meta(), MeshSpec(dp_shard=2, ep=2)),
     Expect(PlanError, "plan_ep", "unknown dispatch", "'nccl'", '"all_gather" or "hierarchical"')),
    # --- architectures ---
    ("unknown-architecture", lambda: compose(plan_fsdp())(nn.Linear(4, 4), TWO),
     Expect(PlanError, "", "unrecognised model architecture", "Linear", "recognisers tried: moefn")),
    ("not-a-module", lambda: compose(plan_fsdp())("model", TWO),  # type: ignore[arg-type]
     Expect(PlanError, "model", "expected an nn.Module, got str", "'model'", "pass the model")),
    # --- composition ---
    ("stages-out-of-order", lambda: compose(plan_fsdp(), plan_ep())(meta(), EP2),
     Expect(PlanError, "", "out of the canonical order", "fsdp → ep", "cp, tp, ep, ac, fsdp")),
    ("stage-repeated", lambda: compose(plan_ac(), plan_ac())(meta(), TWO),
     Expect(PlanError, "", "out of the canonical order", "ac → ac", "cp, tp, ep, ac, fsdp")),
    ("stage-applied-twice", lambda: plan_fsdp()(fsdp_plan()),
     Expect(PlanError, "", "stage fsdp already applied", "('fsdp',)", "apply each stage once")),
    ("stage-after-a-later-one", lambda: plan_ac()(fsdp_plan()),
     Expect(PlanError, "", "out of the canonical order", "fsdp → ac", "cp, tp, ep, ac, fsdp")),
    ("two-meshes", lambda: compose(plan_ep(mesh=EP2), plan_fsdp())(
        meta(), MeshSpec(dp_shard=4, ep=4)),
     Expect(PlanError, "mesh", "two different meshes", "ep=4 vs dp_replicate=1,dp_shard=4,cp=1,ep=2",
            "give one MeshSpec")),
    ("stage-mesh-differs-from-plan", lambda: plan_ac(mesh=MeshSpec(dp_shard=4))(fsdp_plan()),
     Expect(PlanError, "mesh", "two different meshes", "dp_shard=4", "give one MeshSpec")),
    ("no-mesh", lambda: compose(plan_fsdp())(meta()),
     Expect(PlanError, "mesh", "no mesh given", "None", "pass a MeshSpec")),
    # --- options ---
    ("unknown-precision", lambda: compose(plan_fsdp(precision="fp16"))(meta(), TWO),  # type: ignore[arg-type]
     Expect(PlanError, "plan_fsdp", "unknown precision", "'fp16'", '"bf16" or "fp32"')),
    ("unknown-lm-head-precision",
     lambda: compose(plan_fsdp(lm_head_precision="fp8"))(meta(), TWO),  # type: ignore[arg-type]
     Expect(PlanError, "plan_fsdp", "unknown precision", "'fp8'", '"bf16" or "fp32"')),
    ("unknown-ac-mode", lambda: compose(plan_ac(mode="sometimes"))(meta(), TWO),  # type: ignore[arg-type]
     Expect(PlanError, "plan_ac", "unknown checkpoint mode", "'sometimes'", "'selective'")),
    ("ac-every-zero", lambda: compose(plan_ac(every=0))(meta(), TWO),
     Expect(PlanError, "plan_ac", "every must be at least 1", "0", "every=1")),
    ("ac-every-negative", lambda: compose(plan_ac(every=-3))(meta(), TWO),
     Expect(PlanError, "plan_ac", "every must be at least 1", "-3", "every=1")),
    ("ac-skip-matching-nothing", lambda: compose(plan_ac(skip=("blocks.*",)))(meta(), TWO),
     Expect(PlanError, "blocks.*", "matches no block", "blocks.*", "layers.0")),
    ("ac-every-fractional", lambda: compose(plan_ac(every=1.5))(meta(), TWO),  # type: ignore[arg-type]
     Expect(PlanError, "plan_ac", "every", "1.5", "every=")),
    ("ac-skip-as-string", lambda: compose(plan_ac(skip="blocks.0"))(meta(), TWO),  # type: ignore[arg-type]
     Expect(PlanError, "blocks.0", "matches no block", "blocks.0", "layers.0")),
    ("fsdp-flag-not-bool", lambda: compose(plan_fsdp(reshard_after_forward="no"))(  # type: ignore[arg-type]
        meta(), TWO),
     Expect(PlanError, "plan_fsdp", "reshard_after_forward", "'no'", "True or False")),
    # --- plan files ---
    ("json-malformed", load("{not json"),
     Expect(PlanFormatError, "(plan file)", "not valid JSON", "line 1", "to_json(plan)")),
    ("json-not-a-document", load("[]"),
     Expect(PlanFormatError, "(plan file)", "not a moefn plan", "[]", '"format": "moefn.plan"')),
    ("json-wrong-format-marker", load(edited(lambda d: _set(d, format="pickle"))),
     Expect(PlanFormatError, "(plan file)", "not a moefn plan", '"format": "pickle"',
            '"format": "moefn.plan"')),
    ("json-newer-version", load(edited(lambda d: _set(d, version=4))),
     Expect(PlanFormatError, "(plan file).version", "unsupported plan format version", "4",
            "upgrade moefn")),
    ("json-version-as-text", load(edited(lambda d: _set(d, version="1"))),
     Expect(PlanFormatError, "(plan file).version", "unsupported plan format version", "'1'",
            "versions 1..3")),
    ("json-version-as-bool", load(edited(lambda d: _set(d, version=True))),
     Expect(PlanFormatError, "(plan file).version", "unsupported plan format version", "True",
            "versions 1..3")),
    ("json-tensor-shape-float", load(edited(
        lambda d: _set(d["plan"]["model"]["tensors"][0], shape=[64.0, 32]))),
     Expect(PlanFormatError, "plan.model.tensors[0].shape[0]", "expected int", "64.0", FORMAT_FIX)),
    ("json-bool-as-int", load(edited(
        lambda d: _set(d["plan"]["model"]["tensors"][0], requires_grad=1))),
     Expect(PlanFormatError, "plan.model.tensors[0].requires_grad", "expected bool", "1",
            FORMAT_FIX)),
    ("json-unknown-stage", load(edited(lambda d: _set(d["plan"], stages=["ep", "pp"]))),
     Expect(PlanFormatError, "plan.stages[1]", "expected one of", "pp", FORMAT_FIX)),
    ("json-unknown-record-kind", load(edited(
        lambda d: _set(step_of(d, "FullyShard", ""), record="PipelineStage"))),
     Expect(PlanFormatError, "plan.steps[13]", "matches none of", "PipelineStage", FORMAT_FIX)),
    ("json-record-smuggling-code", load(edited(
        lambda d: _set(step_of(d, "FullyShard", ""), record=CODE))),
     Expect(PlanFormatError, "plan.steps[13]", "matches none of", "__import__", FORMAT_FIX)),
    ("json-root-record-smuggling-code", load(edited(lambda d: _set(d["plan"], record=CODE))),
     Expect(PlanFormatError, "plan", "expected a ShardPlan object", "__import__", FORMAT_FIX)),
    ("json-extra-field", load(edited(lambda d: _set(d["plan"]["mesh"], pp=2))),
     Expect(PlanFormatError, "plan.mesh", "unexpected ['pp']", "MeshSpec", FORMAT_FIX)),
    ("json-missing-field", load(edited(lambda d: d["plan"]["mesh"].pop("cp"))),
     Expect(PlanFormatError, "plan.mesh", "missing ['cp']", "MeshSpec", FORMAT_FIX)),
    ("json-invalid-mesh", load(edited(lambda d: _set(d["plan"]["mesh"], dp_shard=0))),
     Expect(PlanFormatError, "plan.mesh", "dp_shard must be a positive integer", '"dp_shard": 0',
            FORMAT_FIX)),
    ("json-step-field-wrong-type", load(edited(
        lambda d: _set(step_of(d, "FullyShard", ""), shard_dim="0"))),
     Expect(PlanFormatError, "plan.steps[13].shard_dim", "expected int", "'0'", FORMAT_FIX)),
    ("json-unknown-mesh-axis", load(edited(
        lambda d: _set(step_of(d, "FullyShard", ""), mesh_dims=["pp"]))),
     Expect(PlanFormatError, "plan.steps[13].mesh_dims[0]", "expected one of", "pp", FORMAT_FIX)),
    ("json-pickle-bytes", load(PICKLE_PAYLOAD),
     Expect(PlanFormatError, "(plan file)", "not valid JSON", "utf-8", "to_json(plan)")),
    ("json-deeply-nested", load('{"format": "moefn.plan", "version": 1, "plan": '
                                + "[" * 100_000 + "]" * 100_000 + "}"),
     Expect(PlanFormatError, "(plan file)", "not valid JSON", "recursion", "to_json(plan)")),
    ("json-repeated-stage", load(edited(lambda d: _set(d["plan"], stages=["ep", "ep", "fsdp"]))),
     Expect(PlanFormatError, "plan.stages", "stage", "ep", FORMAT_FIX)),
]


def meshes_on(device_type: str) -> DeviceMeshes:
    """build_device_meshes on torch's fake process group of 2 ranks."""
    with fake_world(2):
        return build_device_meshes(TWO, device_type)


def _offline_params() -> list[Any]:
    return [pytest.param(call, expect, id=name) for name, call, expect in OFFLINE]


@pytest.mark.parametrize(("call", "expect"), _offline_params())
def test_bad_input_is_refused_with_path_value_and_fix(call: Callable[[], object],
                                                      expect: Expect) -> None:
    check_error(error_of(call), expect)


@pytest.mark.parametrize("payload", [
    pytest.param(PICKLE_PAYLOAD, id="pickle-bytes"),
    pytest.param(PICKLE_PAYLOAD.decode("latin-1"), id="pickle-as-text"),
    pytest.param(edited(lambda d: _set(d["plan"], record=CODE)), id="code-in-record"),
    pytest.param(edited(lambda d: _set(step_of(d, "FullyShard", ""), param_dtype=CODE)),
                 id="code-in-dtype"),
    pytest.param(edited(lambda d: _set(d["plan"]["model"], family=CODE)), id="code-in-family"),
])
def test_loading_a_plan_never_executes_code(payload: str | bytes) -> None:
    SENTINEL.unlink(missing_ok=True)
    try:
        plan = from_json(payload)  # type: ignore[arg-type]
        diff(plan)  # rendering a loaded plan does not evaluate its strings either
    except Exception:  # noqa: BLE001 - the error type is the corpus' business
        pass
    assert not SENTINEL.exists(), "loading a plan executed code"


# ---------------------------------------------------------------------------------------------
# Multi-rank cases: already-parallelized models, and realize (atomic)
# ---------------------------------------------------------------------------------------------


def _seeded(preset: str = "tiny-full") -> MoETransformer:
    torch.manual_seed(0)
    return MoETransformer(get_preset(preset))


def _realized(stages: tuple[Any, ...], mesh: MeshSpec = EP2) -> MoETransformer:
    model = _seeded()
    realize(compose(*stages)(model, mesh).unwrap(), model, build_device_meshes(mesh, "cpu"))
    return model


def _replan_dtensors(rank: int) -> object:
    return compose(plan_ep())(_realized((plan_ep(),)), EP2)


def _replan_hand_distributed(rank: int) -> object:
    """DTensor parameters that moefn did not make are refused too."""
    model = MoETransformer(get_preset("tiny"))
    mesh = build_device_meshes(EP2, "cpu").get(("ep",))
    experts = model.get_submodule("layers.1.mlp.experts")
    experts.gate_up = nn.Parameter(distribute_tensor(experts.gate_up.detach(), mesh, [DShard(0)]))
    return compose(plan_ep())(model, EP2)


def _replan_fsdp(rank: int) -> object:
    return compose(plan_fsdp())(_realized((plan_fsdp(precision="fp32"),)), EP2)


def _replan_checkpointed(rank: int) -> object:
    return compose(plan_ac())(_realized((plan_ac(),)), EP2)


REPLAN: dict[str, tuple[Callable[[int], object], Expect]] = {
    "replan-ep-realized": (_replan_dtensors, Expect(
        PlanError, "layers.1.mlp.experts", "already parallelized",
        "realized by moefn (DistributeParams, InstallDispatch", "plan the unparallelized model")),
    "replan-dtensor-params": (_replan_hand_distributed, Expect(
        PlanError, "layers.1.mlp.experts.gate_up", "already parallelized", "DTensor parameter",
        "plan the unparallelized model")),
    "replan-fsdp-units": (_replan_fsdp, Expect(
        PlanError, "(root)", "already parallelized", "FSDPMoETransformer, realized by moefn",
        "plan the unparallelized model")),
    "replan-checkpointed-blocks": (_replan_checkpointed, Expect(
        PlanError, "layers.0", "already parallelized", "checkpointed block",
        "plan the unparallelized model")),
}

Built = tuple[ShardPlan, nn.Module, DeviceMeshes]


def _good_plan(preset: str = "tiny-full", mesh: MeshSpec = EP2) -> ShardPlan:
    return from_json(plan_text(preset, mesh))


def _other_preset(rank: int) -> Built:
    return _good_plan("tiny"), _seeded(), build_device_meshes(EP2, "cpu")


def _other_mesh(rank: int) -> Built:
    return _good_plan(), _seeded(), build_device_meshes(MeshSpec(dp_shard=WORLD, ep=4), "cpu")


def _other_world(rank: int) -> Built:
    plan = _good_plan(mesh=MeshSpec(dp_shard=2, ep=2))
    return plan, _seeded(), build_device_meshes(plan.mesh, "cpu")


def _plans_differ(rank: int) -> Built:
    precision = "bf16" if rank == 1 else "fp32"
    model = _seeded()
    plan = compose(plan_ep(), plan_fsdp(precision=precision))(model, EP2).unwrap()
    return plan, model, build_device_meshes(EP2, "cpu")


def _one_rank_other_model(rank: int) -> Built:
    return _good_plan(), _seeded("tiny" if rank == 3 else "tiny-full"), build_device_meshes(
        EP2, "cpu")


def _one_rank_frozen(rank: int) -> Built:
    model = _seeded()
    if rank == 2:
        model.norm.weight.requires_grad_(False)
    return _good_plan(), model, build_device_meshes(EP2, "cpu")


def _untied(rank: int) -> Built:
    model = _seeded()
    model.lm_head.weight = nn.Parameter(model.embed.weight.detach().clone())
    return _good_plan(), model, build_device_meshes(EP2, "cpu")


def _realize_twice(rank: int) -> Built:
    plan = _good_plan()
    model = _seeded()
    meshes = build_device_meshes(EP2, "cpu")
    realize(plan, model, meshes)
    return plan, model, meshes


def _from_file(edit: Callable[[dict[str, Any]], object]) -> Callable[[int], Built]:
    def build(rank: int) -> Built:
        return from_json(edited(edit)), _seeded(), build_device_meshes(EP2, "cpu")
    return build


def _all_steps(record: str, **values: Any) -> Callable[[dict[str, Any]], None]:
    def edit(doc: dict[str, Any]) -> None:
        for step in doc["plan"]["steps"]:
            if step["record"] == record:
                step.update(values)
    return edit


ROOT_UNIT = ("FullyShard", "")


def _in_code(record: str, path: str, **values: Any) -> Callable[[int], Built]:
    """The good plan with one step changed in code, past the types (a plan file is refused on
    load instead: json-unknown-mesh-axis)."""
    def build(rank: int) -> Built:
        plan = _good_plan()
        steps = tuple(evolve(s, **values) if (type(s).__name__, s.path) == (record, path) else s
                      for s in plan.steps)
        return evolve(plan, steps=steps), _seeded(), build_device_meshes(EP2, "cpu")
    return build
EXPERTS = "layers.1.mlp.experts"

# (id, builder, expected problem)
REALIZE: list[tuple[str, Callable[[int], Built], Expect]] = [
    ("plan-for-another-preset", _other_preset, Expect(
        RealizeError, "layers.0.mlp.experts.gate_up", "missing from the model",
        "layers.0.mlp.experts.gate_up", "realize the plan on the model it was made for")),
    ("plan-for-another-mesh", _other_mesh, Expect(
        RealizeError, "mesh", "device mesh differs from the plan's mesh",
        "plan dp_replicate=1,dp_shard=4,cp=1,ep=2, mesh dp_replicate=1,dp_shard=4,cp=1,ep=4",
        "build the device mesh from plan.mesh")),
    ("plan-for-another-world-size", _other_world, Expect(
        RealizeError, "mesh", "world size differs from the plan", "plan 2, world 4",
        "launch as many ranks")),
    ("ranks-hold-different-plans", _plans_differ, Expect(
        RealizeError, "", "ranks hold different plans", "2 distinct fingerprints",
        "same plan and model on every rank")),
    ("one-rank-has-another-model", _one_rank_other_model, Expect(
        RealizeError, "layers.0.mlp.experts.gate_up", "rank 3: tensor in the model is not in the plan",
        "layers.0.mlp.experts.gate_up", "re-plan this model")),
    ("one-rank-froze-a-parameter", _one_rank_frozen, Expect(
        RealizeError, "norm.weight", "rank 2: tensor differs from the plan",
        "requires_grad=True, model [32] float32 requires_grad=False", "re-plan this model")),
    ("tie-broken-in-the-model", _untied, Expect(
        RealizeError, "lm_head.weight", "tensor in the model is not in the plan", "lm_head.weight",
        "re-plan this model")),
    ("model-already-realized", _realize_twice, Expect(
        RealizeError, "(root)", "model is already parallelized",
        "FSDPMoETransformer, realized by moefn", "realize on a fresh model")),
    ("step-on-a-missing-module", _from_file(
        lambda d: _set(step_of(d, "FullyShard", "layers.2"), path="layers.9")), Expect(
        RealizeError, "layers.9", "module in the plan is missing", "FullyShard",
        "re-plan this model")),
    ("dispatch-on-a-non-experts-module", _from_file(
        lambda d: _set(step_of(d, "InstallDispatch", EXPERTS), path="layers.1.attn")), Expect(
        RealizeError, "layers.1.attn", "no token dispatcher", "Attention",
        "plan EP only for recognised experts modules")),
    ("distributed-parameter-missing", _from_file(
        lambda d: _set(step_of(d, "DistributeParams", EXPERTS), params=["gate_up", "bias"])),
     Expect(RealizeError, f"{EXPERTS}.bias", "parameter missing", "bias", "re-plan this model")),
    ("unit-on-an-unknown-mesh-axis", _in_code(*ROOT_UNIT, mesh_dims=("pp",)), Expect(
        RealizeError, "mesh", "no such mesh axes", "pp", "use axes of one view")),
    ("unit-with-an-unknown-dtype", _from_file(
        lambda d: _set(step_of(d, *ROOT_UNIT), param_dtype="float8")), Expect(
        RealizeError, "", "dtype", "float8", "bfloat16")),
    ("unit-ignoring-an-unknown-parameter", _from_file(
        lambda d: _set(step_of(d, *ROOT_UNIT), ignored=["nope.weight"])), Expect(
        RealizeError, "nope.weight", "", "nope.weight", "re-plan")),
    ("unit-shard-dim-out-of-range", _from_file(
        lambda d: _set(step_of(d, *ROOT_UNIT), shard_dim=7)), Expect(
        RealizeError, "", "shard_dim", "7", "re-plan")),
    ("placement-dim-negative", _from_file(
        _all_steps("DistributeParams", placements=[{"record": "Shard", "dim": -5}])), Expect(
        RealizeError, f"{EXPERTS}.gate_up", "", "-5", "re-plan")),
    ("placements-and-mesh-dims-differ-in-length", _from_file(
        _all_steps("DistributeParams", placements=[{"record": "Shard", "dim": 0}] * 2)), Expect(
        RealizeError, EXPERTS, "placements", "2", "re-plan")),
    ("dispatch-expert-count-differs", _from_file(_all_steps("InstallDispatch", num_experts=4)),
     Expect(RealizeError, EXPERTS, "expert", "4", "re-plan")),
]


def _snapshot(model: nn.Module) -> dict[str, Any]:
    def local(t: torch.Tensor) -> torch.Tensor:
        return (t.to_local() if isinstance(t, DTensor) else t).detach().clone()

    return {
        "state": {k: (local(v), v.dtype, v.device, type(v).__name__)
                  for k, v in model.state_dict().items()},
        "ids": {n: id(p) for n, p in model.named_parameters(remove_duplicate=False)},
        "classes": {p: type(m).__name__ for p, m in model.named_modules()},
        "instance_attrs": {p: sorted(vars(m)) for p, m in model.named_modules()},
        "runtime": {p: (id(getattr(m, "dispatcher", None)), id(getattr(m, "impl", None)))
                    for p, m in model.named_modules()},
        "hooks": {n: len(p._backward_hooks or {}) for n, p in model.named_parameters()},
        "tied": getattr(model, "lm_head").weight is getattr(model, "embed").weight,
    }


def _changes(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    changes = [key for key in before if key != "state" and before[key] != after[key]]
    if before["state"].keys() != after["state"].keys():
        return [*changes, "state dict keys"]
    for name, (value, *meta_) in before["state"].items():
        new, *new_meta = after["state"][name]
        if meta_ != new_meta or value.shape != new.shape or not torch.equal(value, new):
            changes.append(f"state {name}")
    return changes


def _forward_runs(model: nn.Module) -> bool:
    ids, pos, _ = make_batch(getattr(model, "config"), batch=2, seq=8, seed=1)
    with torch.no_grad():
        logits = model(ids, pos)[0]
    return bool(torch.isfinite(logits).all()) and tuple(logits.shape[:2]) == (2, 8)


def _attempt(rank: int, build: Callable[[int], Built]) -> dict[str, Any]:
    plan, model, meshes = build(rank)
    before = _snapshot(model)
    outcome: dict[str, Any] = {"error": None}
    try:
        realize(plan, model, meshes)
    except PlanError as err:
        outcome["error"] = err
    except Exception as err:  # noqa: BLE001 - reported to the parent as text
        outcome["error"] = f"{type(err).__name__}: {err}"[:500]
    outcome["changes"] = _changes(before, _snapshot(model))
    outcome["tied"] = (before["tied"], model.lm_head.weight is model.embed.weight)
    outcome["local_dispatch"] = all(isinstance(m.dispatcher, LocalDispatch)
                                    for m in model.modules() if hasattr(m, "dispatcher"))
    # only an untouched model runs forward here: a half-realized one could desynchronise ranks
    outcome["forward"] = _forward_runs(model) if not outcome["changes"] else None
    return outcome


def _multi_rank_corpus(rank: int, world: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, (call, _) in REPLAN.items():
        try:
            out[name] = error_of(lambda call=call: call(rank))  # type: ignore[misc]
        except Exception as err:  # noqa: BLE001
            out[name] = f"{type(err).__name__}: {err}"[:500]
        _free(out[name])
    for name, build, _ in REALIZE:
        out[name] = _attempt(rank, build)
        _free(out[name]["error"])
    return out


def _free(error: object) -> None:
    """Destroy the case's process groups (each gloo group holds threads until it is freed);
    the error's traceback would keep the case's meshes, and so its groups, alive."""
    while isinstance(error, BaseException):
        error.__traceback__ = None
        error = error.__cause__ or error.__context__
    release_groups()


@pytest.fixture(scope="module")
def corpus(ranks: Callable[[int], RankPool]) -> list[dict[str, Any]]:
    """Every multi-rank case in one call of the 4-rank pool: one result dict per rank."""
    return ranks(WORLD).run(_multi_rank_corpus)


@pytest.mark.parametrize("name", list(REPLAN))
def test_already_parallelized_model_is_refused(corpus: list[dict[str, Any]], name: str) -> None:
    for per_rank in corpus:
        check_error(per_rank[name], REPLAN[name][1])


def _realize_params() -> list[Any]:
    return [pytest.param(name, expect, id=name) for name, _, expect in REALIZE]


@pytest.mark.parametrize(("name", "expect"), _realize_params())
def test_refused_realize_names_path_value_and_fix_on_every_rank(
        corpus: list[dict[str, Any]], name: str, expect: Expect) -> None:
    errors = [per_rank[name]["error"] for per_rank in corpus]
    for error in errors:
        check_error(error, expect)
    assert all(e == errors[0] for e in errors), "ranks raised different errors"


@pytest.mark.parametrize(("name", "expect"), _realize_params())
def test_refused_realize_leaves_the_model_untouched(corpus: list[dict[str, Any]], name: str,
                                                    expect: Expect) -> None:
    for rank, per_rank in enumerate(corpus):
        outcome = per_rank[name]
        assert outcome["error"] is not None, f"rank {rank}: realized"
        assert outcome["changes"] == [], f"rank {rank} changed: {outcome['changes'][:8]}"
        assert outcome["tied"] == (name != "tie-broken-in-the-model",) * 2 or (
            rank == 3 and name == "one-rank-has-another-model"), f"rank {rank}: tie changed"
        assert outcome["local_dispatch"] or name == "model-already-realized"
        assert outcome["forward"] is True, f"rank {rank}: forward fails after refused realize"
