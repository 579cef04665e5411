"""Predicted communication equals what a real step sends and receives, collective by collective.

Each case realizes a plan on 2 or 4 gloo ranks, runs one warm-up step (FSDP's lazy initialisation),
then counts one forward + backward with `CommLedger` and compares, per (kind, group of ranks),
the calls and the bytes each way with `estimate(plan).comm` on every rank. EP all-to-all cases
force each token's two experts onto different EP ranks (expert bias) and predict the rows of
that routing; the all-gather dispatcher does not depend on routing. Hierarchical dispatch's hops
are compared on their own groups: across nodes (ranks 0 and 2, 1 and 3) and within a node.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext

import pytest
from torch import nn
from torch.distributed.tensor.parallel import loss_parallel

from moefn import MeshSpec
from moefn.adapters.reference import causal_lm_loss
from moefn.adapters.reference.moe import Router
from moefn.analyse.comm import group_ranks
from moefn.analyse.dispatch_rows import DispatchRows, rows_of_routing
from moefn.analyse.estimate import estimate
from moefn.analyse.ledger import CommLedger, Traffic
from moefn.plan.options import ACOptions, CPOptions, EPOptions, FSDPOptions
from moefn.plan.records import InstallDispatch, ShardPlan
from moefn.train.loop import global_batch, local_batch
from tests.hf_parity import HFCase, build_hf_pair, hf_batch, logits_of
from tests.parity import Case, build_pair
from tests.ranks import RankPool

FP32 = FSDPOptions(precision="fp32")
BF16 = FSDPOptions(precision="bf16")
A2A = EPOptions(dispatch="all_to_all")
AG = EPOptions(dispatch="all_gather")
TWO_NODES = EPOptions(dispatch="hierarchical", ranks_per_node=2)

Totals = dict[tuple[str, tuple[int, ...]], tuple[int, int, int]]


def _forced_rows(plan: ShardPlan, rank: int, tokens: int,
                 experts: tuple[int, ...]) -> DispatchRows | None:
    """The dispatch rows when every token of every rank picks ``experts``."""
    dispatch = plan.steps_of(InstallDispatch)
    if not experts or not dispatch:
        return None
    routing = [[experts] * (tokens // plan.mesh.tp)] * plan.mesh.ep  # tp: MoE sees a chunk
    return rows_of_routing(routing, dispatch[0].num_experts, plan.mesh.coordinate(rank, "ep"),
                           dispatch[0].ranks_per_node or 1)


def _count_and_predict(rank: int, plan: ShardPlan, step: Callable[[], None],
                       tokens: int, force: tuple[int, ...] = ()) -> tuple[Totals, Totals]:
    """Run ``step`` once (lazy initialisation), count a second run, and predict it (the
    activation dtype and top-k are the estimate's own defaults, read from the plan; the
    dispatch rows those of the forced routing, else uniform routing's)."""
    step()
    with CommLedger() as ledger:
        step()
    measured = {key: (t.calls, t.sent, t.received) for key, t in ledger.totals().items()}
    predicted: dict[tuple[str, tuple[int, ...]], Traffic] = {}
    rows = _forced_rows(plan, rank, tokens, force)
    for c in estimate(plan, rank, tokens_per_rank=tokens, dispatch_rows=rows).comm:
        key = (c.op, group_ranks(plan, rank, c))
        predicted[key] = predicted.get(key, Traffic()) + Traffic(c.calls, c.sent, c.received)
    return measured, {key: (t.calls, t.sent, t.received) for key, t in predicted.items()}


def force_routing(model: nn.Module, experts: tuple[int, ...]) -> None:
    """Every token picks ``experts`` (the routers' expert bias), when any are given."""
    for module in model.modules():
        if isinstance(module, Router) and module.expert_bias is not None and experts:
            module.expert_bias[list(experts)] = 1e3


def measure(rank: int, world: int, case: Case) -> tuple[Totals, Totals]:
    """One step's collectives as `CommLedger` counts them, and as the plan predicts them (with
    tp, the vocabulary-sharded loss under ``loss_parallel``)."""
    reference, model, plan = build_pair(case)
    force_routing(model, case.force_experts)
    batch = global_batch(reference.config, case.batch, case.seq, case.seed)
    mine = local_batch(batch, plan.mesh, rank)

    def step() -> None:
        with loss_parallel() if plan.mesh.tp > 1 else nullcontext():
            logits = model(mine.input_ids, mine.position_ids)
            causal_lm_loss(logits, mine.labels, batch.num_valid).backward()

    return _count_and_predict(rank, plan, step, mine.input_ids.numel(), case.force_experts)


def _measure_hf(rank: int, world: int, case: HFCase) -> tuple[Totals, Totals]:
    reference, model, plan = build_hf_pair(case)
    batch = hf_batch(int(reference.config.vocab_size), case.batch, case.seq, case.seed)
    mine = local_batch(batch, plan.mesh, rank)

    def step() -> None:
        logits_of(model, mine).sum().backward()

    return _count_and_predict(rank, plan, step, mine.input_ids.numel())


CASES = {
    "fsdp, tied embeddings, MTP": Case(mesh="dp_shard=4", stages=(FP32,), preset="tiny-full"),
    "ep all_to_all + fsdp + router AC": Case(
        mesh="dp_shard=4,ep=2", stages=(A2A, ACOptions(), FP32), preset="tiny-full",
        force_experts=(0, 4)),
    "ep all_to_all + bf16 fsdp + selective AC": Case(
        mesh="dp_shard=4,ep=2", stages=(A2A, ACOptions(mode="selective"), BF16),
        preset="tiny-full", force_experts=(0, 4)),
    "cp + ep all_gather + full AC + fsdp": Case(
        mesh="dp_shard=2,cp=2,ep=4", stages=(CPOptions(), AG, ACOptions(mode="full"), FP32),
        preset="tiny"),
    "MLA (K and V widths differ): cp + ep all_gather + fsdp": Case(
        mesh="dp_shard=2,cp=2,ep=2", stages=(CPOptions(), AG, FP32), preset="tiny-mla"),
    "hsdp + ep all_to_all": Case(mesh="dp_replicate=2,dp_shard=2,ep=2", stages=(A2A, FP32),
                                 preset="tiny-full", force_experts=(0, 4)),
    "ep all_to_all without fsdp": Case(mesh="dp_shard=4,ep=2", stages=(A2A,),
                                       preset="tiny-full", force_experts=(0, 4)),
    "experts sharded on dim 1, all_gather": Case(mesh="dp_shard=4,ep=2", stages=(AG, FP32),
                                                 preset="tiny-2experts"),
    # experts 0 and 7 (ep ranks 0 and 3): every token crosses to the other node once, and the
    # rank there forwards it within its node unless it owns the expert
    "ep hierarchical, 2 nodes of 2, + fsdp": Case(
        mesh="dp_shard=4,ep=4", stages=(TWO_NODES, FP32), preset="tiny-full",
        force_experts=(0, 7)),
    "ep hierarchical, 2 nodes of 2, + router AC + fsdp": Case(
        mesh="dp_shard=4,ep=4", stages=(TWO_NODES, ACOptions(), FP32), preset="tiny-full",
        force_experts=(0, 7)),
    "2 ranks: ep all_to_all + fsdp, no experts unit": Case(
        mesh="dp_shard=2,ep=2", stages=(A2A, ACOptions(), FP32), preset="tiny-full",
        force_experts=(0, 4)),
}


HF_CASES = {  # transformers models: the all-gather dispatcher does not depend on routing
    "qwen3_moe: cp + ep all_gather + router AC + fsdp": HFCase(
        family="qwen3_moe", mesh="dp_shard=2,cp=2,ep=2", stages=(CPOptions(), AG, ACOptions(), FP32)),
    "gpt_oss (biased, transposed experts): ep all_gather + router AC + bf16 fsdp": HFCase(
        family="gpt_oss", mesh="dp_shard=4,ep=2", stages=(AG, ACOptions(), BF16)),
    "deepseek_v3 (MLA, shared experts): cp + ep all_gather + full AC + fsdp": HFCase(
        family="deepseek_v3", mesh="dp_shard=2,cp=2,ep=2",
        stages=(CPOptions(), AG, ACOptions(mode="full"), FP32)),
}


@pytest.mark.parametrize("name", HF_CASES)
def test_predicted_comm_of_transformers_models(ranks: Callable[[int], RankPool], name: str) -> None:
    for rank, (measured, predicted) in enumerate(ranks(4).run(_measure_hf, HF_CASES[name])):
        assert measured == predicted, (rank, sorted(measured.items()), sorted(predicted.items()))


@pytest.mark.parametrize("name", CASES)
def test_predicted_comm_is_what_a_step_moves(ranks: Callable[[int], RankPool], name: str) -> None:
    world = MeshSpec.parse(CASES[name].mesh).world_size
    for rank, (measured, predicted) in enumerate(ranks(world).run(measure, CASES[name])):
        assert measured == predicted, (rank, sorted(measured.items()), sorted(predicted.items()))
        assert all(sent > 0 for key, (_, sent, _) in measured.items()), measured


