"""Ring (p2p) context parallelism: parity with one process on 4 gloo ranks, the ring's own
numerics, its communication against `CommLedger`, and its plan.

Each 4-rank layout runs in its own pool call (`_run_case`), the parity cases against the
single-process model (losses and every gradient, relative ≤ 1e-5, none zero).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.distributed as dist
from attrs import evolve
from torch import Tensor

import moefn.realize.ring_attention as ring_module
from moefn import MeshSpec, compose, plan_ac, plan_cp, plan_fsdp
from moefn.adapters.reference.layers import local_attention
from moefn.analyse.render import diff
from moefn.plan.errors import PlanError
from moefn.plan.options import ACOptions, CPOptions, EPOptions, FSDPOptions
from moefn.plan.records import ContextParallelAttention, ShardPlan
from moefn.plan.serialize import from_json, to_json
from moefn.realize.context_parallel import shard_sequence
from moefn.realize.ring_attention import ring_attention
from tests.hf_parity import HFCase, assert_hf_parity, run_hf_parity
from tests.parity import Case, assert_parity, run_parity
from tests.ranks import RankPool
from tests.test_comm import measure

RING = CPOptions(comm="p2p")
FSDP = FSDPOptions(precision="fp32")
A2A = EPOptions(dispatch="all_to_all")
ROUTER_AC = ACOptions(mode="router")
PARITY = {
    "ring cp=2, GQA": Case(mesh="dp_shard=2,cp=2", stages=(RING,)),
    "ring cp=4 + fsdp": Case(mesh="cp=4", stages=(RING, FSDP)),
    "ring cp=2, bidirectional + fsdp": Case(mesh="dp_shard=2,cp=2", stages=(RING, FSDP),
                                            preset="tiny-bidirectional"),
    "ring cp=2 x ep=2 x router AC x fsdp": Case(mesh="dp_shard=2,cp=2,ep=2",
                                                stages=(RING, A2A, ROUTER_AC, FSDP),
                                                preset="tiny-full"),
    "ring cp=2 x ep=2 x router AC x fsdp, MLA": Case(mesh="dp_shard=2,cp=2,ep=2",
                                                     stages=(RING, A2A, ROUTER_AC, FSDP),
                                                     preset="tiny-mla"),
}
HF_PARITY = {
    "qwen3_moe: ring cp=2 x ep=2 x router AC x fsdp": HFCase(
        family="qwen3_moe", mesh="dp_shard=2,cp=2,ep=2", stages=(RING, A2A, ROUTER_AC, FSDP)),
}
COMM = {  # predicted == counted; full AC runs the forward ring again in backward
    "ring cp=4, full AC + fsdp": Case(mesh="cp=4", stages=(RING, ACOptions(mode="full"),
                                                          FSDP)),
    "ring cp=2 + fsdp, MLA": Case(mesh="dp_shard=2,cp=2", stages=(RING, FSDP), preset="tiny-mla"),
}
BROKEN = Case(mesh="cp=4", stages=(RING,))


def _no_rescale(out: Tensor, lse: Tensor, block_out: Tensor,
                block_lse: Tensor) -> tuple[Tensor, Tensor]:
    """The merge with one bug: the running output is not rescaled by its new weight."""
    merged = torch.logaddexp(lse, block_lse)
    return out + block_out * (block_lse - merged).exp()[..., None], merged


def _ring_alone(rank: int, world: int, heads: tuple[int, int], dims: tuple[int, int],
                causal: bool) -> dict[str, Any]:
    """Ring attention on raw tensors over all 4 ranks against SDPA on the whole sequence:
    outputs, dQ, dK, dV (max abs error) and how many score tiles each rank computed."""
    (hq, hkv), (dqk, dv), seq = heads, dims, 32
    generator = torch.Generator().manual_seed(0)
    full = [torch.randn(2, h, seq, d, generator=generator, dtype=torch.float64).float()
            for h, d in ((hq, dqk), (hkv, dqk), (hkv, dv))]
    weights = torch.randn(2, hq, seq, dv, generator=generator)
    pos = torch.arange(seq).expand(2, seq)
    leaves = [t.clone().requires_grad_() for t in full]
    (local_attention(*leaves, pos, causal) * weights).sum().backward()
    mine = [shard_sequence(t, world, rank, dim=2).requires_grad_() for t in full]
    tiles = [0]
    block_forward = ring_module._block_forward

    def counting(*args: Any) -> tuple[Tensor, Tensor]:
        tiles[0] += 1
        return block_forward(*args)

    setattr(ring_module, "_block_forward", counting)
    try:
        out = ring_attention(*mine, shard_sequence(pos, world, rank), causal, dist.group.WORLD)
    finally:
        setattr(ring_module, "_block_forward", block_forward)
    (out * shard_sequence(weights, world, rank, dim=2)).sum().backward()
    reference = shard_sequence(local_attention(*full, pos, causal), world, rank, dim=2)
    errors = [float((out - reference).abs().max())]
    errors += [float((m.grad - shard_sequence(f.grad, world, rank, dim=2)).abs().max())
               for m, f in zip(mine, leaves, strict=True)]
    return {"errors": errors, "tiles": tiles[0]}


def _broken_merge(rank: int, world: int) -> dict[str, Any]:
    saved = ring_module.merge_partials
    ring_module.merge_partials = _no_rescale
    try:
        return run_parity(rank, world, BROKEN)
    finally:
        ring_module.merge_partials = saved


def _run_alone(rank: int, world: int) -> dict[str, Any]:
    return {f"alone {heads} {dims} causal={causal}": _ring_alone(rank, world, heads, dims, causal)
            for causal in (True, False)
            for heads, dims in (((4, 2), (8, 8)), ((2, 2), (12, 8)))}


def _run_case(rank: int, world: int, name: str) -> dict[str, Any]:
    """One layout per pool call: each realize leaves threads torch keeps (tests/ranks.py)."""
    if name in PARITY:
        return {name: run_parity(rank, world, PARITY[name])}
    if name in HF_PARITY:
        return {name: run_hf_parity(rank, world, HF_PARITY[name])}
    if name in COMM:
        return {name: measure(rank, world, COMM[name])}
    return {name: _broken_merge(rank, world)}


@pytest.fixture(scope="module")
def results(ranks: Callable[[int], RankPool]) -> list[dict[str, Any]]:
    pool = ranks(4)
    answer: list[dict[str, Any]] = pool.run(_run_alone)
    for name in [*PARITY, *HF_PARITY, *COMM, "broken merge"]:
        for mine, got in zip(answer, pool.run(_run_case, name), strict=True):
            mine.update(got)
    return answer


def test_ring_attention_alone_matches_sdpa_and_skips_masked_tiles(
        results: list[dict[str, Any]]) -> None:
    for rank_results in results:
        for name, result in rank_results.items():
            if name.startswith("alone"):
                assert max(result["errors"]) <= 1e-5, (name, result)
                # 4 steps × 4 tiles; causal head-tail: 3 on the own block, 2 on each other
                assert result["tiles"] == (9 if "causal=True" in name else 16), (name, result)


@pytest.mark.parametrize("name", PARITY)
def test_ring_matches_one_process(results: list[dict[str, Any]], name: str) -> None:
    for rank_results in results:
        assert_parity(rank_results[name])


@pytest.mark.parametrize("name", HF_PARITY)
def test_ring_in_transformers_matches_one_process(results: list[dict[str, Any]],
                                                  name: str) -> None:
    for rank_results in results:
        assert_hf_parity(rank_results[name])
        assert rank_results[name]["installed"]["cp_attention"] == 2


@pytest.mark.parametrize("name", COMM)
def test_predicted_ring_comm_is_what_a_step_moves(results: list[dict[str, Any]],
                                                  name: str) -> None:
    for rank, rank_results in enumerate(results):
        measured, predicted = rank_results[name]
        assert measured == predicted, (rank, sorted(measured.items()), sorted(predicted.items()))
        assert {kind for kind, _ in measured} >= {"send", "recv"}, measured


def test_a_broken_merge_fails_parity(results: list[dict[str, Any]]) -> None:
    for rank_results in results:
        broken = rank_results["broken merge"]
        assert broken["max_loss_diff"] > 1e-3, broken["losses"]
        with pytest.raises(AssertionError):
            assert_parity(broken)


def _planned(*stages: Any) -> Any:
    from tests.test_plan import meta_model

    return compose(*stages)(meta_model(), MeshSpec(dp_shard=2, cp=2))


def _meta_plan(*stages: Any) -> ShardPlan:
    plan: ShardPlan = _planned(*stages).unwrap()
    return plan


def test_ring_plan_renders_serialises_and_reads_old_plans() -> None:
    plan = _meta_plan(plan_cp(seq_len=32, comm="p2p"), plan_fsdp())
    assert {s.comm for s in plan.steps_of(ContextParallelAttention)} == {"p2p"}
    assert "ring (p2p) K/V over cp(2), head_tail layout, seq_len 32" in diff(plan)
    assert from_json(to_json(plan)) == plan
    default = _meta_plan(plan_cp(seq_len=32))
    doc = json.loads(to_json(default))  # a version-1 plan written before comm existed
    del doc["plan"]["options"]
    doc["version"] = 1
    old = json.dumps(doc).replace(', "comm": "all_gather"', "")
    assert '"comm"' not in old
    assert from_json(old) == evolve(default, options=())


def test_ring_refuses_unknown_comm_and_selective_checkpointing() -> None:
    bad = _planned(plan_cp(seq_len=32, comm="ring")).failure()  # type: ignore[arg-type]
    assert isinstance(bad, PlanError)
    assert "unknown context-parallel communication" in str(bad)
    assert "comm='ring'" in str(bad) and 'comm="p2p"' in str(bad)
    selective = _planned(plan_cp(seq_len=32, comm="p2p"), plan_ac(mode="selective")).failure()
    assert "selective checkpointing cannot save ring attention" in str(selective)
    _meta_plan(plan_cp(seq_len=32), plan_ac(mode="selective"))  # all-gather: still allowed
