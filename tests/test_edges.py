"""The edges of the public API and the command line: wrong-typed and out-of-range arguments end
in moefn's typed errors (path, value, fix) — never another exception, never a hang — and ranks
of one cp group whose inputs disagree get an InputError instead of a transport error.

Property tests substitute one generated value for one argument of a valid call; a value the
call accepts must work (the call returns), any other must raise a PlanError whose problems all
name a value and a fix. Hypothesis' deadline bounds each case.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from attrs import evolve
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from returns.result import Failure, Success

from moefn import (
    MeshSpec,
    PlanError,
    RealizeError,
    compose,
    inspect_model,
    plan_ac,
    plan_cp,
    plan_ep,
    plan_fsdp,
    plan_or_raise,
)
from moefn.adapters.reference import MoETransformer, get_preset
from moefn.adapters.transformers.pretrained import load_pretrained
from moefn.analyse.estimate import estimate
from moefn.analyse.render import diff
from moefn.cli import main
from moefn.plan.errors import ArgumentTypeError, InputError
from moefn.plan.serialize import from_json, to_json
from moefn.realize import build_device_meshes, realize
from moefn.realize.simulate import simulate
from moefn.train.accumulate import no_gradient_sync
from moefn.train.clip import clip_grad_norm
from moefn.train.dcp import load_checkpoint, materialize_from_checkpoint, save_checkpoint
from moefn.train.loop import Batch, global_batch, local_batch, train
from moefn.train.routing import update_expert_bias
from tests.ranks import RankPool

FAST = settings(max_examples=10, deadline=2000, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])

# anything a caller might pass by mistake: wrong types, zero, negatives, huge, NaN, text
ANYTHING = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 3), st.integers(-2**70, 2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=6),
    st.binary(max_size=4), st.lists(st.integers(0, 3), max_size=3),
    st.just(object()), st.just(Success(1)), st.just(plan_ep), st.just(torch.zeros(2)),
)
# the same, without the values a count or a rate accepts (calls that would run long on those)
NOT_A_COUNT = ANYTHING.filter(lambda v: not (type(v) is int and v >= 1))
NOT_A_RATE = ANYTHING.filter(lambda v: isinstance(v, bool) or not isinstance(v, int | float)
                             or not 0 <= v <= 1e38)


def check_outcome(call: Callable[[], object]) -> object:
    """Run ``call``: it returns (accepted), returns a Failure of a PlanError, or raises one;
    every problem names a value and a fix. Any other exception fails the test."""
    try:
        outcome = call()
    except PlanError as err:
        outcome = Failure(err)
    if isinstance(outcome, Failure):
        err = outcome.failure()
        assert isinstance(err, PlanError), repr(err)
        for p in err.problems:
            assert p.message.strip() and p.value.strip() and len(p.fix) > 8, p
        return err
    return outcome


@functools.cache
def meta_model(preset: str = "tiny") -> MoETransformer:
    """A meta-device model (cached: planning only reads it)."""
    with torch.device("meta"):
        return MoETransformer(get_preset(preset))


MESH = MeshSpec(dp_shard=4, ep=2, cp=1)
CP_MESH = MeshSpec(dp_shard=2, cp=2)
PLAN = compose(plan_ep(), plan_fsdp())(meta_model(), MESH).unwrap()


# ---------------------------------------------------------------------------------------------
# Named misuses from issue 24
# ---------------------------------------------------------------------------------------------


def test_result_passed_to_realize_says_unwrap() -> None:
    with pytest.raises(ArgumentTypeError) as info:
        realize(Success(PLAN), meta_model(), None)  # type: ignore[arg-type]
    (problem,) = info.value.problems
    assert problem.path == "plan" and "Success" in problem.value and ".unwrap()" in problem.fix
    assert isinstance(info.value, TypeError)


def test_uncalled_stage_factory_says_call_it() -> None:
    with pytest.raises(ArgumentTypeError) as info:
        compose(plan_ep)  # type: ignore[arg-type]
    (problem,) = info.value.problems
    assert problem.path == "compose argument 0" and "plan_ep" in problem.value
    assert problem.fix.startswith("call it: plan_ep(")


def test_swapped_realize_arguments_are_named() -> None:
    with pytest.raises(ArgumentTypeError, match="realize takes \\(plan, model, meshes\\)"):
        realize(meta_model(), PLAN, None)  # type: ignore[arg-type]


def test_mesh_parse_of_a_number_is_a_type_error() -> None:
    with pytest.raises(TypeError) as info:
        MeshSpec.parse(42)  # type: ignore[arg-type]
    assert isinstance(info.value, PlanError) and info.value.problems[0].value == "42"


def test_stage_mesh_of_the_wrong_type() -> None:
    with pytest.raises(ArgumentTypeError, match="MeshSpec.parse"):
        plan_fsdp(mesh="dp_shard=4")  # type: ignore[arg-type]


def test_meshes_need_a_process_group() -> None:
    with pytest.raises(RealizeError, match="init_process_group"):
        build_device_meshes(MESH, "cpu")


def test_top_k_larger_than_the_experts() -> None:
    with pytest.raises(PlanError) as info:
        estimate(PLAN, top_k=9)
    assert info.value.problems[0].fix == "use top_k in 1..8"


# ---------------------------------------------------------------------------------------------
# Properties: one generated value in one argument of a valid call
# ---------------------------------------------------------------------------------------------


def _batch() -> Batch:
    return global_batch(get_preset("tiny"), batch=4, seq=8, seed=0)


def _small_model() -> MoETransformer:
    torch.manual_seed(0)
    return MoETransformer(get_preset("tiny"))


MODEL = _small_model()
MISSING = "/nonexistent-moefn-checkpoint"
CALLS: dict[str, Callable[[Any], object]] = {
    "MeshSpec.dp_shard": lambda v: MeshSpec(dp_shard=v),
    "MeshSpec.ep": lambda v: MeshSpec(dp_shard=4, ep=v),
    "MeshSpec.parse": lambda v: MeshSpec.parse(v),
    "MeshSpec.size": lambda v: MESH.size(v),
    "MeshSpec.parse.world_size": lambda v: MeshSpec.parse("dp_shard=2", world_size=v),
    "plan_cp.seq_len": lambda v: compose(plan_cp(seq_len=v))(meta_model(), CP_MESH),
    "plan_cp.mesh": lambda v: compose(plan_cp(mesh=v))(meta_model(), CP_MESH),
    "plan_ep.dispatch": lambda v: compose(plan_ep(dispatch=v))(meta_model(), MESH),
    "plan_ac.mode": lambda v: compose(plan_ac(mode=v))(meta_model(), MESH),
    "plan_ac.skip": lambda v: compose(plan_ac(skip=v))(meta_model(), MESH),
    "plan_ac.every": lambda v: compose(plan_ac(every=v))(meta_model(), MESH),
    "plan_fsdp.precision": lambda v: compose(plan_fsdp(precision=v))(meta_model(), MESH),
    "plan_fsdp.lm_head_precision":
        lambda v: compose(plan_fsdp(lm_head_precision=v))(meta_model(), MESH),
    "plan_fsdp.offload": lambda v: compose(plan_fsdp(offload=v))(meta_model(), MESH),
    "compose": lambda v: compose(v),
    "inspect_model": lambda v: inspect_model(v),
    "Planner.model": lambda v: compose(plan_fsdp())(v, MESH),
    "Planner.mesh": lambda v: compose(plan_fsdp())(meta_model(), v),
    "from_json": lambda v: from_json(v),
    "to_json": lambda v: to_json(v),
    "diff.plan": lambda v: diff(v),
    "diff.other": lambda v: diff(PLAN, v) if v is not None else None,
    "plan_or_raise": lambda v: plan_or_raise(v),
    "realize.plan": lambda v: realize(v, meta_model(), None),  # type: ignore[arg-type]
    "realize.model": lambda v: realize(PLAN, v, None),  # type: ignore[arg-type]
    "realize.meshes": lambda v: realize(PLAN, meta_model(), v),
    "build_device_meshes.spec": lambda v: build_device_meshes(v, "cpu"),
    "build_device_meshes.device_type": lambda v: build_device_meshes(MESH, v),
    "estimate.plan": lambda v: estimate(v),
    "estimate.rank": lambda v: estimate(PLAN, rank=v),
    "estimate.tokens_per_rank": lambda v: estimate(PLAN, tokens_per_rank=v),
    "estimate.top_k": lambda v: estimate(PLAN, top_k=v),
    "estimate.hidden": lambda v: estimate(PLAN, hidden=v),
    "estimate.optimizer": lambda v: estimate(PLAN, optimizer=v),
    "estimate.activation_dtype": lambda v: estimate(PLAN, activation_dtype=v),
    "get_preset": lambda v: get_preset(v),
    "simulate.plan": lambda v: simulate(v, meta_model),
    "simulate.build_model": lambda v: simulate(PLAN, v),
    "simulate.ranks": lambda v: simulate(PLAN, meta_model, [v]),
    "global_batch.batch": lambda v: global_batch(get_preset("tiny"), batch=v, seq=4, seed=0)
    if not (type(v) is int and v > 64) else None,
    "global_batch.config": lambda v: global_batch(v, batch=2, seq=4, seed=0),
    "local_batch.batch": lambda v: local_batch(v, MESH, 0),
    "local_batch.mesh": lambda v: local_batch(_batch(), v, 0),
    "local_batch.rank": lambda v: local_batch(_batch(), MESH, v),
    "Batch.split": lambda v: _batch().split(v),
    "train.steps": lambda v: train(MODEL, _batch(), 8, steps=v, lr=0.0),
    "train.lr": lambda v: train(MODEL, _batch(), 8, steps=1, lr=v),
    "clip_grad_norm.parameters": lambda v: clip_grad_norm(v, 1.0),
    "clip_grad_norm.max_norm": lambda v: clip_grad_norm(MODEL.parameters(), v),
    "clip_grad_norm.norm_type": lambda v: clip_grad_norm(MODEL.parameters(), 1.0, v),
    "update_expert_bias.model": lambda v: update_expert_bias(v, distributed=False),
    "update_expert_bias.rate": lambda v: update_expert_bias(MODEL, rate=v, distributed=False),
    "no_gradient_sync": lambda v: no_gradient_sync(v).__enter__(),
    "save_checkpoint.path": lambda v: save_checkpoint(v, MODEL, None),
    "save_checkpoint.optimizer": lambda v: save_checkpoint(MISSING, MODEL, v),
    "load_checkpoint.path": lambda v: load_checkpoint(
        f"{MISSING}/{v}" if isinstance(v, str) else v, MODEL, None),
    "materialize_from_checkpoint.device":
        lambda v: materialize_from_checkpoint(MISSING, meta_model(), v),
    "load_pretrained.path": lambda v: load_pretrained(meta_model(), v, "cpu"),
    "load_pretrained.device": lambda v: load_pretrained(meta_model(), MISSING, v),
}
# accepting a valid value would run long or write files: only values the call must refuse
REFUSE_ONLY = {"train.steps", "train.lr", "simulate.ranks", "save_checkpoint.path",
               "save_checkpoint.optimizer", "load_pretrained.path"}


@pytest.mark.parametrize("name", sorted(CALLS))
def test_public_functions_refuse_with_typed_errors(name: str) -> None:
    not_a_rank = ANYTHING.filter(lambda v: not (type(v) is int and 0 <= v < 4))
    values = {"train.steps": NOT_A_COUNT, "train.lr": NOT_A_RATE,
              "simulate.ranks": not_a_rank}.get(name, ANYTHING)
    if name in ("save_checkpoint.path", "load_pretrained.path"):
        values = ANYTHING.filter(lambda v: not isinstance(v, str))
    if name == "save_checkpoint.optimizer":
        values = ANYTHING.filter(lambda v: v is not None)

    @FAST
    @given(values)
    def case(value: Any) -> None:
        outcome = check_outcome(lambda: CALLS[name](value))
        if name in REFUSE_ONLY:
            assert isinstance(outcome, PlanError), f"{name}({value!r}) accepted"

    case()


# ---------------------------------------------------------------------------------------------
# The command line: every flag; exit 0, 1 or 2, never a traceback
# ---------------------------------------------------------------------------------------------


def run_cli(argv: list[str]) -> int:
    """The exit code of ``moefn argv``; SystemExit (argparse usage errors) counts as its code."""
    try:
        return main(argv)
    except SystemExit as stop:
        return int(stop.code or 0)


FLAG_TEXT = st.one_of(st.sampled_from(["0", "-1", "1", "9", "2.5", "", "x", "1e3", "07"]),
                      st.text(max_size=5))
PLAN_ARGS = ["plan", "--model", "tiny", "--mesh", "dp_shard=4,ep=2"]


@pytest.mark.parametrize("flag", ["--tokens", "--top-k", "--mesh", "--dispatch", "--precision",
                                  "--optimizer", "--model"])
def test_plan_flags_exit_0_1_or_2(flag: str, capsys: pytest.CaptureFixture[str]) -> None:
    @settings(max_examples=15, deadline=5000, derandomize=True)
    @given(FLAG_TEXT)
    def case(text: str) -> None:
        argv = [*PLAN_ARGS]
        if flag in argv:
            argv[argv.index(flag) + 1] = text
        else:
            argv += [flag, text]
        code = run_cli(argv)
        err = capsys.readouterr().err
        assert code in (0, 1, 2) and "Traceback" not in err, (argv, code, err)

    case()


@pytest.mark.parametrize("flag", ["--nproc", "--steps", "--micro-batches"])
def test_demo_counts_below_one_are_usage_errors(flag: str) -> None:
    for text in ("0", "-1", "2.5", "x", ""):
        assert run_cli(["demo", flag, text]) == 2, (flag, text)


def test_bench_steps_zero_is_a_usage_error() -> None:
    assert run_cli(["bench", "--steps", "0"]) == 2


@pytest.mark.parametrize("argv", [["--nproc", "1"], ["--out", "/no/such/dir/mine.json"],
                                  ["--out", "."]])
def test_calibrate_refuses_before_measuring(argv: list[str],
                                            capsys: pytest.CaptureFixture[str]) -> None:
    """One rank has no peer for a collective (gloo failed with 'Pair is not connected'); an
    unwritable --out failed only after the whole measurement."""
    assert run_cli(["calibrate", *argv]) == 2
    assert argv[1] in capsys.readouterr().err


def test_top_k_above_the_experts_exits_1(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli([*PLAN_ARGS, "--top-k", "9"]) == 1
    assert "top-k larger than the number of experts" in capsys.readouterr().out


QWEN = {"model_type": "qwen3_moe", "num_hidden_layers": 2, "hidden_size": 64,
        "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 16, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
        "vocab_size": 128}


@pytest.mark.parametrize("field", sorted(set(QWEN) - {"model_type"}))
def test_hf_config_values_exit_1_or_0(field: str, tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("transformers")
    path = tmp_path / "config.json"

    @settings(max_examples=6, deadline=10000, derandomize=True)
    @given(st.one_of(st.integers(-2, 0), st.integers(5, 9), st.just(None), st.just("x"),
                     st.just(2.5), st.just([1])))
    def case(value: Any) -> None:
        path.write_text(json.dumps({**QWEN, field: value}))
        code = run_cli(["plan", "--hf-config", str(path), "--mesh", "dp_shard=2,ep=2"])
        err = capsys.readouterr().err
        assert code in (0, 1) and "Traceback" not in err, (field, value, code, err)

    case()


@pytest.mark.parametrize("content", [
    None, "a directory", "{not json", "[]", '{"model_type": "no_such_model"}',
    '{"model_type": "qwen3_moe", "num_experts_per_tok": 9, "num_experts": 4}'])
def test_hf_config_files_that_cannot_be_read(content: str | None, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "config.json"
    if content == "a directory":
        path.mkdir()
    elif content is not None:
        path.write_text(content)
    assert run_cli(["plan", "--hf-config", str(path), "--mesh", "dp_shard=2,ep=2"]) == 1
    assert "fix:" in capsys.readouterr().out


def test_a_dense_transformers_config_names_the_architecture(tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    """transformers builds a dense Llama; moefn's own refusal is what the user reads, whole."""
    pytest.importorskip("transformers")
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model_type": "llama", "hidden_size": 32, "intermediate_size": 64,
                                "num_hidden_layers": 1, "num_attention_heads": 4,
                                "num_key_value_heads": 2, "vocab_size": 128}))
    assert run_cli(["plan", "--hf-config", str(path), "--mesh", "dp_shard=2,ep=2"]) == 1
    out = capsys.readouterr().out
    assert "unrecognised model architecture (value: LlamaForCausalLM)" in out, out
    assert "transformers cannot build" not in out and out.rstrip().endswith("moefn plans of each"), out


# ---------------------------------------------------------------------------------------------
# Ranks: device meshes and process groups that do not fit, inputs that disagree in a cp group
# ---------------------------------------------------------------------------------------------


def _problems_of(call: Callable[[], object]) -> list[tuple[str, str]]:
    try:
        call()
    except PlanError as err:
        return [(type(err).__name__, str(p)) for p in err.problems]
    return []


def _meshes_that_do_not_fit(rank: int, world: int) -> dict[str, list[tuple[str, str]]]:
    torch.manual_seed(0)
    model = MoETransformer(get_preset("tiny"))
    two = MeshSpec(dp_shard=2, ep=2)
    meshes = build_device_meshes(two, "cpu")
    four = compose(plan_fsdp())(model, MeshSpec(dp_shard=4)).unwrap()
    plan = compose(plan_ep())(model, two).unwrap()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = {
        "bigger-mesh": _problems_of(lambda: build_device_meshes(MeshSpec(dp_shard=4), "cpu")),
        "bigger-plan": _problems_of(lambda: realize(four, model, meshes)),
        "views-swapped": _problems_of(lambda: realize(
            plan, model, evolve(meshes, expert=meshes.dense))),
    }
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) and not hasattr(after[k], "placements")
               for k in before), "a refused realize changed the model"
    return out


def _forward(rank: int, world: int, shapes: list[tuple[int, int]], check_inputs: bool) -> object:
    torch.manual_seed(0)
    model = MoETransformer(get_preset("tiny"))
    mesh = MeshSpec(cp=world)
    plan = compose(plan_cp())(model, mesh).unwrap()
    hooks = len(model._forward_pre_hooks)
    realize(plan, model, build_device_meshes(mesh, "cpu"), check_inputs=check_inputs)
    if not check_inputs:
        return len(model._forward_pre_hooks) - hooks
    rows, seq = shapes[rank]
    ids = torch.zeros(rows, seq, dtype=torch.long)
    try:
        model(ids, torch.arange(seq).expand(rows, seq))
    except InputError as err:
        return [str(p) for p in err.problems]
    except Exception as err:  # noqa: BLE001 - the transport error the check replaces
        return f"not an InputError: {type(err).__name__}: {err}"
    return "ran"


def _hf_forward(rank: int, world: int, give_positions: bool) -> object:
    """A transformers model under cp, called as transformers users do: with or without
    ``position_ids`` (without, its rotary and mask would count each rank's chunks from 0)."""
    from moefn.adapters.transformers.catalogue import build_tiny

    torch.manual_seed(0)
    model = build_tiny("qwen3_moe", device="cpu").float()
    mesh = MeshSpec(cp=world)
    realize(compose(plan_cp(seq_len=8))(model, mesh).unwrap(), model,
            build_device_meshes(mesh, "cpu"))
    ids = torch.zeros(1, 4, dtype=torch.long)
    positions = {"position_ids": torch.tensor([[0, 1, 6, 7], [2, 3, 4, 5]][rank])[None]}
    try:
        model(input_ids=ids, use_cache=False, **(positions if give_positions else {}))
    except InputError as err:
        return [str(p) for p in err.problems]
    return "ran"


def test_ranks_refuse_meshes_and_inputs_that_do_not_fit(ranks: Callable[[int], RankPool]) -> None:
    pool = ranks(2)
    refusals = pool.run(_meshes_that_do_not_fit)
    assert refusals[0] == refusals[1]
    found = refusals[0]
    assert found["bigger-mesh"] == [("RealizeError", "mesh: process group smaller than the mesh "
                                     "(value: mesh 4 ranks, process group 2) -- fix: launch 4 "
                                     "ranks or plan for 2")]
    assert found["bigger-plan"][0][1].startswith("mesh: process group smaller than the plan's")
    assert [kind for kind, _ in found["views-swapped"]] == ["RealizeError"]
    assert "meshes.expert: device mesh view differs" in found["views-swapped"][0][1]

    assert pool.run(_forward, [(1, 8), (1, 8)], True) == ["ran", "ran"]
    chunks = pool.run(_forward, [(1, 8), (1, 4)], True)
    assert chunks[0] == chunks[1] and len(chunks[0]) == 1
    assert "argument 0 2-dim [1, 8]" in chunks[0][0] and "argument 0 2-dim [1, 4]" in chunks[0][0]
    rows = pool.run(_forward, [(2, 8), (1, 8)], True)
    assert rows[0] == rows[1] and "rank 1: 2 tensors: argument 0 2-dim [1, 8]" in rows[0][0]
    assert pool.run(_forward, [], False) == [0, 0]  # the switch: no hook at all
    pytest.importorskip("transformers")
    assert pool.run(_hf_forward, True) == ["ran", "ran"]
    missing = pool.run(_hf_forward, False)
    assert missing[0] == missing[1] and "no position_ids under context parallelism" in missing[0][0]


def test_input_check_cost_is_what_the_readme_says() -> None:
    from moefn.realize.input_check import MAX_TENSORS

    assert 8 * (1 + 3 * MAX_TENSORS) == 200
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    assert "200 bytes" in readme


@pytest.mark.parametrize(("call", "error", "says"), [
    (lambda: MeshSpec(dp_shard=4, ep=2).coordinate(4, "ep"), PlanError, "use a rank in 0..3"),
    (lambda: MeshSpec(dp_shard=4, ep=2).coordinate(-1, "ep"), PlanError, "rank"),
    (lambda: MeshSpec(dp_shard=4, ep=2).coordinate(1, "pp"), PlanError, "use one of"),
    (lambda: MeshSpec(dp_shard=4, ep=2).group_ranks(1.0, ("ep",)), TypeError, "int"),
    (lambda: MeshSpec(dp_shard=4, ep=2).group_ranks(1, "ep"), TypeError, "axes"),
])
def test_mesh_coordinates_check_their_arguments(call: Callable[[], object], error: type,
                                                says: str) -> None:
    with pytest.raises(error) as info:
        call()
    assert says in str(info.value) and isinstance(info.value, PlanError)


def test_demo_refuses_more_local_ranks_than_it_can_start() -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--nproc", "100000"])
    assert exit_info.value.code == 2
