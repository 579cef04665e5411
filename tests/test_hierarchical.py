"""Hierarchical dispatch: plan_ep's option (validation, plan JSON) and parity on 4 gloo ranks
as 2 nodes of 2 — the reference model under every AC mode and transformers' DeepSeek-V3
(group-limited routing), losses and every gradient against one process."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
from attrs import evolve

from moefn import MeshSpec, compose, plan_ep, plan_fsdp
from moefn.plan.errors import PlanFormatError
from moefn.plan.options import ACOptions, EPOptions, FSDPOptions
from moefn.plan.records import InstallDispatch
from moefn.plan.serialize import from_json, to_json
from tests.hf_parity import HFCase, assert_hf_parity, run_hf_parity
from tests.parity import Case, assert_parity, run_parity
from tests.ranks import RankPool
from tests.test_plan import meta_model, problems_of

FSDP = FSDPOptions(precision="fp32")
TWO_NODES = EPOptions(dispatch="hierarchical", ranks_per_node=2)


def _parity(rank: int, world: int, mode: str) -> dict[str, Any]:
    if mode == "deepseek_v3":
        return run_hf_parity(rank, world, HFCase(
            family="deepseek_v3", mesh="dp_shard=4,ep=4",
            stages=(TWO_NODES, ACOptions(mode="selective"), FSDP)))
    ac = () if mode == "none" else (ACOptions(mode=mode),)
    # expert 0 forced: every token crosses to node 0, some ranks get few rows
    case = Case(mesh="dp_shard=4,ep=4", stages=(TWO_NODES, *ac, FSDP), preset="tiny-full",
                force_experts=(0,) if mode == "router" else ())
    return run_parity(rank, world, case)


def test_hierarchical_dispatch_keeps_losses_and_gradients(
        ranks: Callable[[int], RankPool]) -> None:
    hf = ranks(4).run(_parity, "deepseek_v3")[0]
    assert_hf_parity(hf)
    assert hf["installed"]["dispatchers"] == ["HierarchicalDispatch"]
    for mode in ("none", "full", "router", "selective"):  # one per call: see tests/ranks.py
        result = ranks(4).run(_parity, mode)[0]
        assert result["losses"], mode
        assert_parity(result)


def _plan(mesh: str = "dp_shard=8,ep=8", **options: Any) -> Any:
    return compose(plan_ep(**options), plan_fsdp())(meta_model("tiny"), MeshSpec.parse(mesh))


def test_ranks_per_node_is_checked() -> None:
    plan = _plan(dispatch="hierarchical", ranks_per_node=4).unwrap()
    steps = plan.steps_of(InstallDispatch)
    assert steps and all((s.kind, s.ranks_per_node) == ("hierarchical", 4) for s in steps)
    assert problems_of(_plan(dispatch="hierarchical", ranks_per_node=3)) == (
        "ranks_per_node does not divide ep",)
    for bad in (None, 0, 2.0, True):
        assert problems_of(_plan(dispatch="hierarchical", ranks_per_node=bad)) == (
            "hierarchical dispatch needs a whole number of ranks per node, at least 1",)
    assert problems_of(_plan(ranks_per_node=2)) == (
        "ranks_per_node applies to hierarchical dispatch only",)
    failure = _plan(dispatch="hierarchical", ranks_per_node=3).failure().problems[0]
    assert (failure.value, failure.fix) == (
        "ranks_per_node=3, ep=8", "use ranks_per_node in (1, 2, 4, 8) (GPUs per node, at most ep=8)")


def test_plan_json_keeps_ranks_per_node_and_reads_older_plans() -> None:
    plan = _plan(dispatch="hierarchical", ranks_per_node=2).unwrap()
    assert from_json(to_json(plan)) == plan
    flat = _plan().unwrap()
    doc = json.loads(to_json(flat))
    for step in doc["plan"]["steps"]:  # a plan written before ranks_per_node existed
        if step["record"] == "InstallDispatch":
            del step["ranks_per_node"]
    with pytest.raises(PlanFormatError, match="missing \\['ranks_per_node'\\]"):
        from_json(json.dumps(doc))  # version 2 files have it
    del doc["plan"]["options"]  # version 1 files had neither
    doc["version"] = 1
    assert from_json(json.dumps(doc)) == evolve(flat, options=())
    doc["plan"]["steps"][0].pop("path")
    with pytest.raises(PlanFormatError, match="missing \\['path'\\]"):
        from_json(json.dumps(doc))
