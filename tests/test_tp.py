"""Tensor parallelism: parity with one process on 4 gloo ranks (one pool run per layout), the
gradient rule, and the plan (validation, JSON, diff).

Each parity case compares losses and every gradient with the single-process model (relative
≤ 1e-5, none zero); a tp group's loss counts once (`tests.parity.train_side_by_side`).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from typing import Any
from unittest import mock

import pytest
import torch
from attrs import evolve

import moefn.plan.stages.common as common
from moefn import MeshSpec, compose, parallelize, plan_cp, plan_ep, plan_fsdp, plan_tp
from moefn.adapters.reference import MoETransformer, get_preset
from moefn.analyse.render import diff
from moefn.plan.options import ACOptions, CPOptions, EPOptions, FSDPOptions, StageOptions, TPOptions
from moefn.plan.records import DistributeParams, Shard, ShardPlan, SyncGradients, TensorParallel
from moefn.plan.serialize import from_json, to_json
from moefn.realize import build_device_meshes
from moefn.train.loop import global_batch, local_batch, train
from tests import hf_parity
from tests.hf_parity import HFCase, assert_hf_parity, run_hf_parity
from tests.parity import Case, assert_parity, run_parity
from tests.ranks import RankPool
from tests.test_comm import measure

TP = TPOptions()
FSDP = FSDPOptions(precision="fp32")
PARITY = {
    "tp=2 x dp_shard=2": Case(mesh="dp_shard=2,tp=2", stages=(TP,)),
    "tp=2 x dp_shard=2 x ep=2, router AC, fsdp": Case(
        mesh="dp_shard=2,tp=2,ep=2", stages=(TP, EPOptions(), ACOptions(mode="router"), FSDP)),
    "tp=2 x cp=2": Case(mesh="cp=2,tp=2", stages=(CPOptions(), TP)),
    "tp=2 x dp_shard=2 x ep=2, router AC, fsdp, MLA": Case(
        mesh="dp_shard=2,tp=2,ep=2", stages=(TP, EPOptions(), ACOptions(mode="router"), FSDP),
        preset="tiny-mla"),
    "tp=2 x dp_shard=2, dense layer, MTP, tied embedding": Case(
        mesh="dp_shard=2,tp=2", stages=(TP,), preset="tiny-full"),
    # 3 KV heads for 6 query heads: k_proj/v_proj replicated, rank 0 reads K/V heads 0, 0, 1
    "tp=2 x dp_shard=2, K/V heads replicated": Case(
        mesh="dp_shard=2,tp=2", stages=(TP,), preset="tiny-kv3"),
}


@pytest.mark.parametrize("name", PARITY)
def test_tp_matches_one_process(ranks: Callable[[int], RankPool], name: str) -> None:
    for result in ranks(4).run(run_parity, PARITY[name]):
        assert_parity(result)


HF_LAYOUTS = {
    "tp=2 x dp_shard=2": ("dp_shard=2,tp=2", (TP,)),
    "tp=2 x dp_shard=2 x ep=2, router AC, fsdp": (
        "dp_shard=2,tp=2,ep=2", (TP, EPOptions(), ACOptions(mode="router"), FSDP)),
    "tp=2 x cp=2": ("cp=2,tp=2", (CPOptions(), TP)),
}
#: Mixtral with a sliding window shorter than the sequence: transformers' own mask, built from
#: the embedding's sequence chunk, would be wrong under tp.
HF_FAMILIES: tuple[tuple[str, tuple[tuple[str, Any], ...]], ...] = (
    ("qwen3_moe", ()), ("mixtral", (("sliding_window", 8),)))


def _hf_parity(rank: int, world: int, mesh: str,
               stages: tuple[StageOptions, ...]) -> list[dict[str, Any]]:
    """Both families on one layout in one pool call."""
    return [run_hf_parity(rank, world, HFCase(family=family, mesh=mesh, stages=stages, steps=2,
                                              extra=extra))
            for family, extra in HF_FAMILIES]


@pytest.mark.parametrize("name", HF_LAYOUTS)
def test_tp_transformers_families_match_one_process(ranks: Callable[[int], RankPool],
                                                    name: str) -> None:
    for results in ranks(4).run(_hf_parity, *HF_LAYOUTS[name]):
        for (family, _), result in zip(HF_FAMILIES, results, strict=True):
            assert result["attn_implementation"] == "moefn", family
            assert_hf_parity(result)
            assert max(result["grad_errors"].values()) <= 1e-5, (family, result["grad_errors"])


def _hf_parity_without_gradient_rule(rank: int, world: int, mesh: str,
                                     stages: tuple[StageOptions, ...]) -> list[dict[str, Any]]:
    rule = common.dense_dp_dims
    common.dense_dp_dims = common.tp_sharded_dp_dims
    try:
        return _hf_parity(rank, world, mesh, stages)
    finally:
        common.dense_dp_dims = rule


COMM = {
    "tp=2 x dp_shard=2": PARITY["tp=2 x dp_shard=2"],
    "tp=2 x dp_shard=2 + fsdp": Case(mesh="dp_shard=2,tp=2", stages=(TP, FSDP)),
    # routing forced (tiny-full's expert bias), so the predicted EP rows are exact
    "tp=2 x dp_shard=2 x ep=2, router AC, MTP": Case(
        mesh="dp_shard=2,tp=2,ep=2", stages=(TP, EPOptions(), ACOptions(mode="router")),
        preset="tiny-full", force_experts=(0, 4)),
    # K/V projections replicated: FSDP gathers them whole, CP gathers the K/V heads each computes
    "tp=2 x cp=2, K/V heads replicated, fsdp": Case(
        mesh="cp=2,tp=2", stages=(CPOptions(), TP, FSDP), preset="tiny-kv3"),
}


@pytest.mark.parametrize("name", COMM)
def test_predicted_tp_comm_is_what_a_step_moves(ranks: Callable[[int], RankPool],
                                                name: str) -> None:
    for rank, (measured, predicted) in enumerate(ranks(4).run(measure, COMM[name])):
        assert measured == predicted, (rank, sorted(measured.items()), sorted(predicted.items()))
        tp_group = (rank - rank % 2, rank - rank % 2 + 1)
        assert {op for op, group in measured if group == tp_group} >= {
            "all_gather", "reduce_scatter"}, measured


def _parity_without_gradient_rule(rank: int, world: int, case: Case) -> dict[str, Any]:
    """`run_parity` with the gradient rule removed: parameters that are not tp-sharded sum
    their gradients over dp_shard_cp only, not over tp."""
    rule = common.dense_dp_dims
    common.dense_dp_dims = common.tp_sharded_dp_dims
    try:
        return run_parity(rank, world, case)
    finally:
        common.dense_dp_dims = rule


def test_parity_breaks_without_the_gradient_rule(ranks: Callable[[int], RankPool]) -> None:
    for result in ranks(4).run(_parity_without_gradient_rule, PARITY["tp=2 x dp_shard=2"]):
        worst = max(result["grad_errors"].items(), key=lambda kv: kv[1])
        assert worst[1] > 1e-2, worst
        with pytest.raises(AssertionError):
            assert_parity(result)


def test_transformers_parity_breaks_without_the_gradient_rule(
        ranks: Callable[[int], RankPool]) -> None:
    for results in ranks(4).run(_hf_parity_without_gradient_rule,
                                *HF_LAYOUTS["tp=2 x dp_shard=2"]):
        for result in results:
            worst = max(result["grad_errors"].items(), key=lambda kv: kv[1])
            assert worst[1] > 1e-2, worst
            with pytest.raises(AssertionError):
                assert_hf_parity(result)


def _parity_with_replicated_kv_not_summed_over_tp(rank: int, world: int,
                                                  case: Case) -> dict[str, Any]:
    """`run_parity` with the wrong rule for replicated K/V projections: as if each tp rank's
    gradient were the whole one (summed over dp_shard_cp only, like a tp-sharded weight's)."""
    sharded = ShardPlan.tp_sharded_paths

    def with_replicated_kv(plan: ShardPlan) -> tuple[str, ...]:
        return (*sharded(plan), *(s.path for s in plan.steps_of(TensorParallel) if s.kv_heads))

    ShardPlan.tp_sharded_paths = with_replicated_kv  # type: ignore[method-assign]
    try:
        return run_parity(rank, world, case)
    finally:
        ShardPlan.tp_sharded_paths = sharded  # type: ignore[method-assign]


def test_replicated_kv_parity_breaks_without_the_sum_over_tp(
        ranks: Callable[[int], RankPool]) -> None:
    case = evolve(PARITY["tp=2 x dp_shard=2, K/V heads replicated"], steps=1)  # no drift yet
    for result in ranks(4).run(_parity_with_replicated_kv_not_summed_over_tp, case):
        wrong = {n: e for n, e in result["grad_errors"].items() if e > 1e-2}
        assert wrong and all(n.endswith(("k_proj.weight", "v_proj.weight")) for n in wrong), wrong


#: Qwen3-MoE with one K/V head (and per-head q/k norms) and a dense first layer
QWEN3_KV1_DENSE = (("mlp_only_layers", [0]),)


def _hf_replicated_kv_and_dense_mlp(rank: int, world: int) -> dict[str, Any]:
    with mock.patch.dict(hf_parity._COMMON, num_key_value_heads=1):
        return run_hf_parity(rank, world, HFCase(family="qwen3_moe", mesh="dp_shard=2,tp=2",
                                                 stages=(TP, FSDP), extra=QWEN3_KV1_DENSE))


def test_tp_replicates_a_transformers_single_kv_head_and_splits_its_dense_mlp(
        ranks: Callable[[int], RankPool]) -> None:
    for result in ranks(4).run(_hf_replicated_kv_and_dense_mlp):
        assert_hf_parity(result)
        assert max(result["grad_errors"].values()) <= 1e-5, result["grad_errors"]
    with mock.patch.dict(hf_parity._COMMON, num_key_value_heads=1):
        model = hf_parity.build_hf("qwen3_moe", device="meta", **dict(QWEN3_KV1_DENSE))
    plan = compose(plan_tp())(model, MeshSpec(tp=2)).unwrap()
    styles = {s.path: (s.style, s.kv_heads) for s in plan.steps_of(TensorParallel)}
    assert styles["model.layers.0.mlp"] == ("gather", None)
    assert styles["model.layers.0.mlp.down_proj"] == ("rowwise", None)
    assert styles["model.layers.1.self_attn.k_proj"] == ("replicate", (4, 1))
    assert "model.layers.1.mlp" not in styles  # the MoE block: its tokens stay split


def _train_both_ways(rank: int, world: int) -> tuple[list[float], list[float]]:
    """`moefn.parallelize` with tp, trained by `moefn.train.loop.train`; and one process."""
    mesh = MeshSpec.parse("dp_shard=2,tp=2")
    config = get_preset("tiny")
    batch = global_batch(config, 4, 16, 0)
    torch.manual_seed(0)
    reference = MoETransformer(config)
    model = copy.deepcopy(reference)
    model, _ = parallelize(model, build_device_meshes(mesh, "cpu"), tp=TP, fsdp=FSDP)
    return (train(model, local_batch(batch, mesh, rank), batch.num_valid, 2, 0.25),
            train(reference, batch, batch.num_valid, 2, 0.25, distributed=False))


def test_parallelize_with_tp_trains_like_one_process(ranks: Callable[[int], RankPool]) -> None:
    for losses, reference in ranks(4).run(_train_both_ways):
        assert losses == pytest.approx(reference, rel=1e-6), (losses, reference)


def _meta(preset: str = "tiny") -> MoETransformer:
    with torch.device("meta"):
        return MoETransformer(get_preset(preset))


def test_tp_plan_shards_attention_mlp_and_vocabulary_and_sums_the_rest_over_tp() -> None:
    plan: ShardPlan = compose(plan_tp(), plan_ep())(_meta("tiny-full"),
                                                     MeshSpec.parse("dp_shard=2,tp=2,ep=2")).unwrap()
    styles = {s.path: s.style for s in plan.steps_of(TensorParallel)}
    assert styles["layers.0.attn"] == styles["layers.0.mlp"] == "gather"
    assert styles["layers.0.attn.q_proj"] == styles["layers.0.mlp.up_proj"] == "colwise"
    assert styles["layers.1.attn.o_proj"] == "rowwise"
    assert (styles["embed"], styles["lm_head"]) == ("vocab_embed", "vocab_head")
    assert "layers.1.mlp.shared.up_proj" not in styles  # shared experts see distinct tokens
    placed = {s.path: s.placements for s in plan.steps_of(DistributeParams) if s.mesh_dims == ("tp",)}
    assert placed["layers.0.attn.o_proj"] == (Shard(1),)
    assert "lm_head" not in placed  # tied to embed.weight, placed there
    sync = {s.path: s.mesh_dims for s in plan.steps_of(SyncGradients)}
    assert sync[""] == ("dp_shard_cp_tp",)  # the gradient rule
    assert sync["layers.0.attn.q_proj"] == ("dp_shard_cp",)
    assert sync["layers.1.mlp.experts"] == ("ep_shard",)
    text = diff(plan)
    assert "tensor parallel rowwise over tp(2)" in text
    assert "gradient all-reduce (sum) over dp_shard_cp_tp(4)" in text
    assert from_json(to_json(plan)) == plan


def test_deepseek_v3_plans_with_tp_and_experts_span_tp() -> None:
    mesh = MeshSpec.parse("dp_shard=256,tp=4,ep=64")
    plan = compose(plan_tp(), plan_ep(), plan_fsdp())(_meta("deepseek-v3"), mesh).unwrap()
    assert (mesh.world_size, mesh.ep_shard) == (1024, 16)  # ep_shard · ep = dp_shard · cp · tp
    styles = {s.path: s.style for s in plan.steps_of(TensorParallel)}
    assert styles["layers.5.attn.kv_a_proj"] == "replicate"  # MLA's latent stays whole
    assert "kv_a_proj ×61 [tp] replicated over tp(4): MLA latent, whole on every rank" in " ".join(
        diff(plan).split())
    assert styles["layers.5.attn.kv_b_proj"] == "colwise"
    assert [mesh.group_ranks(5, ("tp",)), mesh.group_ranks(5, ("ep",))[:4]] == [
        (4, 5, 6, 7), (0, 1, 2, 3)]


def test_tp_refuses_what_does_not_divide_naming_path_value_and_fix() -> None:
    problems = compose(plan_tp())(_meta(), MeshSpec(tp=3)).failure().problems
    found = {(p.path, p.message): (p.value, p.fix) for p in problems}
    assert found[("layers.0.attn", "attention heads not divisible by tp")] == (
        "4, tp=3", "use tp in (1, 2, 4)")
    assert found[("embed", "vocabulary not divisible by tp")][0] == "64, tp=3"
    assert ("layers.1.attn.q_proj", "output features not divisible by tp") in found
    assert "without plan_tp" in str(compose(plan_cp())(_meta(), MeshSpec(cp=2, tp=2)).failure())
    assert "tp axis larger than 1" in str(compose(plan_tp())(_meta(), MeshSpec(dp_shard=2)).failure())
    tied = compose(plan_tp(), plan_fsdp())(_meta("tiny-full"), MeshSpec(dp_shard=2, tp=2))
    assert "untie the embedding" in str(tied.failure())


def test_tp_replicates_kv_projections_whose_heads_do_not_divide_and_says_so() -> None:
    plan = compose(plan_tp(), plan_fsdp())(_meta(), MeshSpec(tp=4)).unwrap()
    steps = {s.path: s for s in plan.steps_of(TensorParallel)}
    assert [(steps[f"layers.0.attn.{n}"].style, steps[f"layers.0.attn.{n}"].kv_heads)
            for n in ("q_proj", "k_proj", "v_proj")] == [
        ("colwise", None), ("replicate", (4, 2)), ("replicate", (4, 2))]
    assert "layers.0.attn.k_proj" not in plan.tp_sharded_paths()  # its gradient sums over tp
    lines = [line for line in diff(plan).splitlines() if "replicated" in line]
    assert [line.split()[1] for line in lines] == ["layers.*.attn.k_proj", "layers.*.attn.v_proj"]
    assert lines[0].endswith("[tp] replicated over tp(4): 2 KV heads, tp 4 (1 KV head(s) per "
                             "rank for its 1 query head(s)); gradient summed over tp"), lines
    assert '"kv_heads": [4, 2]' in to_json(plan) and from_json(to_json(plan)) == plan


def test_tp_refuses_transformers_families_not_checked_yet() -> None:
    from tests.hf_parity import build_hf

    failure = compose(plan_tp())(build_hf("olmoe", device="meta"), MeshSpec(tp=2)).failure()
    assert [p.value for p in failure.problems] == ["transformers:olmoe (OlmoeForCausalLM)"]
    assert "leave plan_tp out" in str(failure)


def test_version_2_plans_read_without_tp() -> None:
    plan: ShardPlan = compose(plan_ep())(_meta(), MeshSpec(dp_shard=2, ep=2)).unwrap()
    doc = json.loads(to_json(plan))
    assert doc["version"] == 3 and doc["plan"]["mesh"]["tp"] == 1
    del doc["plan"]["mesh"]["tp"]
    doc["version"] = 2
    assert from_json(json.dumps(doc)) == plan
    doc["version"] = 3
    with pytest.raises(Exception, match="missing \\['tp'\\]"):
        from_json(json.dumps(doc))
    assert evolve(plan.mesh, tp=1).as_text() == "dp_replicate=1,dp_shard=2,cp=1,ep=2"
    assert MeshSpec.parse("dp_shard=2,tp=2").as_text() == "dp_replicate=1,dp_shard=2,cp=1,tp=2,ep=1"
