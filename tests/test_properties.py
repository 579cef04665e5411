"""Property tests of planning over random small MoE configs and random meshes that divide them.

Models are built on the meta device (plus one seeded CPU model to check that planning never
changes values). Each test body counts its runs in ``EXAMPLES``; the module prints the totals at
the end (``pytest -s``).
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from attrs import frozen
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from returns.result import Success
from torch import nn
from torch.distributed.tensor import Shard as DShard
from torch.distributed.tensor._utils import _compute_local_shape_and_global_offset

from moefn import MeshSpec, ShardPlan, Stage, compose, inspect_model, stages_from
from moefn.adapters.reference import MoEConfig, MoETransformer
from moefn.analyse.layout import ParamLayout, owning_unit, param_layouts
from moefn.analyse.render import diff
from moefn.plan.options import ACOptions, CPOptions, EPOptions, FSDPOptions, StageOptions
from moefn.plan.records import (
    STAGE_ORDER,
    ActivationCheckpoint,
    DistributeParams,
    FullyShard,
    InstallDispatch,
)
from moefn.plan.serialize import from_json, to_json

EXAMPLES: Counter[str] = Counter()
PROPERTY_SETTINGS = settings(max_examples=100, deadline=None, database=None,
                             suppress_health_check=[HealthCheck.too_slow])


@frozen
class Scenario:
    config: MoEConfig
    mesh: MeshSpec
    stages: tuple[StageOptions, ...]
    frozen: tuple[str, ...]  # parameters with requires_grad=False

    def build_stages(self) -> tuple[Stage, ...]:
        return stages_from(self.stages)

    def model(self, device: str = "meta") -> MoETransformer:
        torch.manual_seed(0)
        with torch.device(device):
            model = MoETransformer(self.config)
        for name in self.frozen:
            model.get_parameter(name).requires_grad_(False)
        return model


@st.composite
def configs(draw: st.DrawFn) -> MoEConfig:
    n_layers = draw(st.integers(1, 3))
    n_experts = draw(st.sampled_from([1, 2, 3, 4, 6, 8, 12, 16]))
    n_heads = draw(st.sampled_from([1, 2, 4]))
    n_dense = draw(st.integers(0, n_layers))
    return MoEConfig(
        vocab_size=draw(st.sampled_from([7, 16, 33, 64])),
        hidden=draw(st.sampled_from([4, 6, 8, 12, 16])),  # uneven splits on purpose
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=draw(st.sampled_from([d for d in (1, 2, 4) if n_heads % d == 0])),
        head_dim=draw(st.sampled_from([2, 4, 8])),
        n_experts=n_experts,
        top_k=draw(st.integers(1, min(n_experts, 4))),
        moe_intermediate=draw(st.sampled_from([2, 3, 4, 8])),
        n_shared_experts=draw(st.integers(0, 2)),
        n_dense_layers=n_dense,
        dense_intermediate=draw(st.sampled_from([4, 10])) if n_dense else 0,
        score_func=draw(st.sampled_from(["softmax", "sigmoid"])),
        expert_bias=draw(st.booleans()),
        router_fp32=draw(st.booleans()),
        tie_embeddings=draw(st.booleans()),
        mtp=draw(st.booleans()),
        causal=draw(st.booleans()),
    )


@st.composite
def scenarios(draw: st.DrawFn) -> Scenario:
    config = draw(configs())
    has_moe = config.n_dense_layers < config.n_layers or config.mtp
    dp_shard = draw(st.integers(1, 6))
    cp = draw(st.sampled_from([1, 1, 2, 4]))
    ep = draw(st.sampled_from([d for d in range(1, dp_shard * cp + 1)
                               if (dp_shard * cp) % d == 0 and config.n_experts % d == 0]))
    mesh = MeshSpec(dp_replicate=draw(st.sampled_from([1, 1, 2])), dp_shard=dp_shard, cp=cp, ep=ep)
    blocks = [f"layers.{i}" for i in range(config.n_layers)]
    stages: list[StageOptions] = []
    if cp > 1 and draw(st.booleans()):
        seq = draw(st.sampled_from([None, 2 * cp, 8 * cp]))
        stages.append(CPOptions(seq_len=seq))
    if ep > 1 and has_moe and draw(st.booleans()):
        stages.append(EPOptions(dispatch=draw(st.sampled_from(["all_to_all", "all_gather"]))))
    if draw(st.booleans()):
        skip = tuple(draw(st.lists(st.sampled_from([*blocks, "layers.*"]), max_size=2, unique=True)))
        stages.append(ACOptions(mode=draw(st.sampled_from(["router", "full", "selective", "none"])),
                                every=draw(st.integers(1, 3)), skip=skip))
    if draw(st.booleans()) or not stages:
        stages.append(FSDPOptions(
            precision=draw(st.sampled_from(["bf16", "fp32"])),
            reshard_after_forward=draw(st.booleans()),
            lm_head_precision=draw(st.sampled_from([None, "fp32", "bf16"])),
            wrap_outer_model=draw(st.booleans()),
            shard_frozen=draw(st.booleans()),
        ))
    names = [name for name, _ in param_names(config)]
    frozen_names = tuple(draw(st.lists(st.sampled_from(names), max_size=3, unique=True)))
    return Scenario(config=config, mesh=mesh, stages=tuple(stages), frozen=frozen_names)


@functools.cache
def param_names(config: MoEConfig) -> tuple[tuple[str, tuple[int, ...]], ...]:
    with torch.device("meta"):
        return tuple((n, tuple(p.shape)) for n, p in MoETransformer(config).named_parameters())


def plan_of(scenario: Scenario, model: nn.Module | None = None) -> ShardPlan:
    result = compose(*scenario.build_stages())(model if model is not None else scenario.model(),
                                               scenario.mesh)
    assert isinstance(result, Success), result
    plan: ShardPlan = result.unwrap()
    return plan


# ---------------------------------------------------------------------------------------------


def _structure(model: nn.Module) -> dict[str, Any]:
    return {
        "params": [(n, id(p), tuple(p.shape), p.dtype, p.device, p.requires_grad, type(p))
                   for n, p in model.named_parameters(remove_duplicate=False)],
        "buffers": [(n, id(b), tuple(b.shape), b.dtype, b.device)
                    for n, b in model.named_buffers()],
        "modules": [(n, type(m), sorted(vars(m)), len(m._forward_hooks), len(m._forward_pre_hooks))
                    for n, m in model.named_modules()],
    }


@PROPERTY_SETTINGS
@given(scenarios())
def test_planning_is_deterministic_and_never_mutates_the_model(scenario: Scenario) -> None:
    EXAMPLES["deterministic and pure"] += 1
    model = scenario.model("meta")
    before = _structure(model)
    first = plan_of(scenario, model)
    assert plan_of(scenario, model) == first
    assert plan_of(scenario) == first  # a fresh model of the same config plans the same
    assert to_json(plan_of(scenario)) == to_json(first)
    assert _structure(model) == before
    real = scenario.model("cpu")
    values = {k: v.clone() for k, v in real.state_dict().items()}
    real_before = _structure(real)
    assert plan_of(scenario, real) == first  # the device does not matter to a plan
    assert _structure(real) == real_before
    assert all(torch.equal(values[k], v) for k, v in real.state_dict().items())


def _units_containing(name: str, units: tuple[FullyShard, ...]) -> list[FullyShard]:
    return [u for u in units if u.path == "" or name.startswith(u.path + ".")]


@PROPERTY_SETTINGS
@given(scenarios())
def test_every_parameter_is_placed_exactly_once(scenario: Scenario) -> None:
    EXAMPLES["placed once"] += 1
    plan = plan_of(scenario)
    spec = plan.model
    params = {t.name: t for t in spec.tensors if not t.is_buffer}
    layouts = param_layouts(plan)
    assert set(layouts) == set(params)
    # at most one DistributeParams step per parameter, only on parameters the model has
    placed = Counter(f"{s.path}.{p}" if s.path else p
                     for s in plan.steps_of(DistributeParams) for p in s.params)
    assert all(count == 1 for count in placed.values()), placed
    assert set(placed) <= set(params)
    for kind in (DistributeParams, InstallDispatch, FullyShard, ActivationCheckpoint):
        paths = [s.path for s in plan.steps_of(kind)]  # type: ignore[type-var]
        assert len(paths) == len(set(paths)), f"a module gets two {kind.__name__} steps"
    units = plan.steps_of(FullyShard)
    by_path = {u.path: u for u in units}
    for name, info in params.items():
        containing = _units_containing(name, units)
        ignoring = [u.path for u in containing if name in u.ignored]
        # a parameter a unit leaves alone is left alone by every enclosing unit, else that
        # enclosing unit would silently shard it
        assert not ignoring or len(ignoring) == len(containing), (name, ignoring)
        owner = owning_unit(name, by_path)
        managing = [u for u in containing if name not in u.ignored]
        assert owner == (max(managing, key=lambda u: len(u.path)) if managing else None)
        assert layouts[name].unit == (None if owner is None else owner.path)
        if not info.requires_grad and not any(
                isinstance(o, FSDPOptions) and o.shard_frozen for o in scenario.stages):
            assert owner is None, f"frozen {name} sharded"
        axes = [axis for axis, _ in layouts[name].shards]
        assert len(axes) == len(set(axes)), (name, axes)
        ranks = 1
        for axis in axes:
            ranks *= plan.mesh.size(axis)
        assert plan.mesh.world_size % ranks == 0, (name, axes)
    # a tied Parameter is one object under several names: the unit that really takes it is the
    # first one realize applies (deepest first) that contains any alias and ignores none
    apply_order = sorted(units, key=lambda s: (-s.path.count(".") - bool(s.path), s.path))
    for group in spec.tied:
        takers = [u for u in apply_order if any(_units_containing(a, (u,)) for a in group)
                  and not any(a in u.ignored for a in group)]
        assert layouts[group[0]].unit == (takers[0].path if takers else None), (group, takers)


def _torch_local_shape(layout: ParamLayout, mesh: MeshSpec, rank: int) -> tuple[int, ...]:
    shape, _ = _compute_local_shape_and_global_offset(
        layout.shape, [mesh.size(axis) for axis, _ in layout.shards],
        [mesh.coordinate(rank, axis) for axis, _ in layout.shards],
        [DShard(dim) for _, dim in layout.shards], skip_offset=True)
    return tuple(shape)


def _chunk_local_shape(layout: ParamLayout, mesh: MeshSpec, rank: int) -> tuple[int, ...]:
    """The same by hand: EP first, then FSDP, each a torch.chunk of what is left."""
    shape = list(layout.shape)
    for axis, dim in layout.shards:
        chunks = torch.arange(shape[dim]).chunk(mesh.size(axis))
        index = mesh.coordinate(rank, axis)
        shape[dim] = chunks[index].numel() if index < len(chunks) else 0
    return tuple(shape)


@PROPERTY_SETTINGS
@given(scenarios())
def test_local_shapes_tile_the_full_tensor(scenario: Scenario) -> None:
    EXAMPLES["local shapes tile"] += 1
    plan = plan_of(scenario)
    mesh = plan.mesh
    checked: set[tuple[Any, ...]] = set()
    for layout in param_layouts(plan).values():
        local = dict(layout.local_shapes(mesh))
        assert sum(local.values()) == mesh.world_size
        numel = 1
        for size in layout.shape:
            numel *= size
        sharded_ranks = 1
        for axis, _ in layout.shards:
            sharded_ranks *= mesh.size(axis)
        replication = mesh.world_size // sharded_ranks
        total = 0
        for shape, count in local.items():
            n = 1
            for size in shape:
                n *= size
            total += n * count
        assert total == numel * replication, (layout, local)
        key = (layout.shape, layout.shards)
        if key in checked:
            continue
        checked.add(key)
        per_rank = Counter(_chunk_local_shape(layout, mesh, r) for r in range(mesh.world_size))
        assert dict(per_rank) == local, (layout, local, per_rank)
        by_torch = Counter(_torch_local_shape(layout, mesh, r) for r in range(mesh.world_size))
        assert by_torch == per_rank, (layout, by_torch)


@PROPERTY_SETTINGS
@given(scenarios())
def test_json_round_trip_is_identity(scenario: Scenario) -> None:
    EXAMPLES["json round trip"] += 1
    plan = plan_of(scenario)
    text = to_json(plan)
    again = from_json(text)
    assert again == plan and hash(again) == hash(plan)
    assert to_json(again) == text
    assert diff(again) == diff(plan)


@PROPERTY_SETTINGS
@given(scenarios())
def test_composing_equals_applying_stages_one_by_one(scenario: Scenario) -> None:
    EXAMPLES["compose equals chaining"] += 1
    model = scenario.model()
    stages = scenario.build_stages()
    composed = compose(*stages)(model, scenario.mesh)
    chained: Any = Success(ShardPlan.empty(inspect_model(model), scenario.mesh))
    for stage in stages:
        chained = chained.bind(stage)
    assert composed == chained
    plan = composed.unwrap()
    assert plan.stages == tuple(o.stage for o in scenario.stages)
    assert plan.options == scenario.stages
    for same in (plan, from_json(to_json(plan))):  # the plan is made again from its options
        assert compose(*stages_from(same.options))(model, same.mesh).unwrap() == plan
    assert list(plan.stages) == sorted(plan.stages, key=STAGE_ORDER.index)
    for cut in range(len(stages) + 1):  # any prefix composed, the rest bound one by one
        partial: Any = compose(*stages[:cut])(model, scenario.mesh)
        for stage in stages[cut:]:
            partial = partial.bind(stage)
        assert partial == composed


@pytest.fixture(scope="module", autouse=True)
def _report_examples() -> Iterator[None]:
    yield
    total = sum(EXAMPLES.values())
    print(f"\nproperty examples run: {total} ({dict(EXAMPLES)})")

