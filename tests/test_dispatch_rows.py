"""Dispatch rows (pure): the exact expectation against brute-force enumeration, the rows of a
given routing counted by hand, the byte records built from them, and the router grouping that
plans record for them."""

from __future__ import annotations

from fractions import Fraction
from itertools import combinations

import pytest
import torch
from attrs import evolve

from moefn.adapters.reference import MoETransformer, get_preset
from moefn.adapters.reference.moe import Router
from moefn.analyse.comm import a2a_dispatch_comm
from moefn.analyse.dispatch_rows import DispatchRows, expected_rows, hit_probability, rows_of_routing
from moefn.plan.errors import PlanError
from moefn.plan.roles import group_facts
from moefn.plan.spec import inspect_model


def _brute_hit(experts: int, top_k: int, first: int, count: int, n_group: int,
               topk_group: int) -> Fraction:
    """Enumerate every group choice and every expert choice inside it (all equally likely)."""
    size = experts // n_group
    total = Fraction(0)
    group_sets = list(combinations(range(n_group), topk_group))
    for groups in group_sets:
        pool = [e for g in groups for e in range(g * size, (g + 1) * size)]
        picks = list(combinations(pool, top_k))
        hits = sum(any(first <= e < first + count for e in pick) for pick in picks)
        total += Fraction(hits, len(picks))
    return total / len(group_sets)


@pytest.mark.parametrize(("experts", "top_k", "n_group", "topk_group"),
                         [(8, 2, 1, 1), (8, 3, 4, 2), (12, 4, 3, 2), (12, 2, 6, 3), (16, 4, 8, 4)])
def test_hit_probability_is_exact(experts: int, top_k: int, n_group: int, topk_group: int) -> None:
    for first in range(experts):
        for count in range(1, experts - first + 1):
            assert hit_probability(experts, top_k, first, count, n_group, topk_group) == \
                _brute_hit(experts, top_k, first, count, n_group, topk_group), (first, count)


def test_group_limited_routing_differs_from_unconstrained() -> None:
    # DeepSeek-V3: top-8 of 256 experts in 4 of 8 groups; at ep=8 a rank holds one group
    limited = expected_rows(1, 256, 8, 8, 0, n_group=8, topk_group=4)
    free = expected_rows(1, 256, 8, 8, 0)
    # another rank's group is picked with p = 1/2 (and then not always used): < 7 · 1/2
    assert limited.sent < Fraction(7, 2) < free.sent
    assert limited.received == limited.sent  # symmetric when groups and ranks align


def test_hierarchical_expectation_splits_the_flat_one() -> None:
    flat = expected_rows(64, 64, 4, 8, 3, n_group=8, topk_group=2)
    two_level = expected_rows(64, 64, 4, 8, 3, ranks_per_node=4, n_group=8, topk_group=2)
    one_node = expected_rows(64, 64, 4, 8, 3, ranks_per_node=8, n_group=8, topk_group=2)
    assert (one_node.sent, one_node.sent_in_node) == (0, flat.sent)
    assert two_level.sent < flat.sent  # one crossing per node, not per rank
    assert flat.sent_in_node == flat.received_in_node == 0


def test_rows_of_a_routing_by_hand() -> None:
    # 4 EP ranks as 2 nodes of 2, 8 experts (2 per rank, 4 per node)
    routing = [[(0, 2), (4, 6), (0, 1)], [(2, 7)], [(1, 3), (4, 5)], []]
    rows = rows_of_routing(routing, 8, ep_rank=0, ranks_per_node=2)
    # sent across: rank 0's tokens to node 1: (4, 6) only; received: rank 2's tokens for node 0
    # forwarded within node 0 by rank 0: tokens of ranks 0 and 2 for rank 1's experts 2, 3
    # received within: none (rank 1's only token, (2, 7), does not need rank 0)
    assert rows == DispatchRows(Fraction(1), Fraction(1), Fraction(2), Fraction(0))
    flat = rows_of_routing(routing, 8, ep_rank=0)
    assert flat == DispatchRows(Fraction(3), Fraction(1))  # (0, 2) to rank 1, (4, 6) to 2 and 3
    with pytest.raises(PlanError, match="divide evenly"):
        rows_of_routing(routing, 8, ep_rank=0, ranks_per_node=3)


def test_dispatch_bytes_count_rows_weights_and_ids() -> None:
    rows = DispatchRows(Fraction(3), Fraction(5))
    counts, data = a2a_dispatch_comm(rows, ("ep",), 4, None, top_k=2, hidden=6, act=4,
                                     num_experts=8)
    assert (counts.sent, counts.received) == (3 * 8, 3 * 8)
    # forward: rows (H + K + one fp32 column holding two int16 ids) out, sums (H) back;
    # backward: the reverse, same rows
    assert data.sent == 4 * (3 * 9 + 5 * 6 + 3 * 6 + 5 * 9)
    assert data.received == 4 * (5 * 9 + 3 * 6 + 5 * 6 + 3 * 9)
    assert data.lower_bound == 2 * 4 * 6 * (3 + 5)
    # 3 ids take 6 bytes: two fp32 columns; past 32767 experts they are int32
    wide = [a2a_dispatch_comm(rows, ("ep",), 4, None, top_k=3, hidden=6, act=4,
                              num_experts=e)[1].sent for e in (8, 40000)]
    assert wide == [4 * (3 * 11 + 5 * 6 + 3 * 6 + 5 * 11), 4 * (3 * 12 + 5 * 6 + 3 * 6 + 5 * 12)]


def _router_facts(model: torch.nn.Module) -> dict[str, int | str | bool]:
    spec = inspect_model(model)
    return dict(spec.module(spec.paths_with("router")[0]).facts)


def test_plans_record_group_limited_routers() -> None:
    from tests.hf_parity import build_hf

    with torch.device("meta"):
        reference = MoETransformer(get_preset("deepseek-v3"))
    assert _router_facts(reference) == {"top_k": 8, "n_group": 8, "topk_group": 4}
    assert _router_facts(build_hf("deepseek_v3", device="meta")) == {
        "top_k": 2, "n_group": 2, "topk_group": 1}
    assert "n_group" not in _router_facts(MoETransformer(get_preset("tiny")))

    class Greedy(torch.nn.Module):  # DeepSeek-V2's "greedy" routing ignores its groups
        num_group, topk_group, topk_method = 8, 3, "greedy"
    assert group_facts(Greedy()) == ()


def test_reference_router_keeps_to_its_groups() -> None:
    config = evolve(get_preset("tiny"), n_experts=16, top_k=3, n_group=4, topk_group=2)
    router = Router(config)
    torch.nn.init.normal_(router.weight)
    index, _ = router(torch.randn(512, config.hidden))
    assert max(len(set((row // 4).tolist())) for row in index) == 2  # groups of 4 experts
    with pytest.raises(ValueError, match="n_group=3 must divide n_experts=16"):
        evolve(config, n_group=3)
    with pytest.raises(ValueError, match="top_k=3 exceeds the 2 experts"):
        evolve(config, n_group=8, topk_group=1)
