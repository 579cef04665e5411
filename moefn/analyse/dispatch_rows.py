"""Rows one rank's expert dispatch moves: exactly for a given routing, or expected for uniform
routing (pure; exact fractions, no ranks).

The all-to-all dispatchers send a token once per destination holding any of its experts.
With ``ranks_per_node = R`` (hierarchical dispatch; ``R = 1`` is the flat all-to-all) a token
first crosses once to every other *node* holding one of its experts (the "across" hop, to the
rank with the same in-node index), and that rank forwards it once to every other rank of its
node holding one (the "within" hop). Rows kept on the rank itself are not counted. EP rank
``r`` owns experts ``[r·E/ep, (r+1)·E/ep)``; node ``n`` holds EP ranks ``[n·R, (n+1)·R)``.

Uniform routing: each token picks ``topk_group`` of ``n_group`` equal contiguous expert groups
uniformly, then ``top_k`` distinct experts uniformly among the picked groups' experts
(``n_group = 1``: plain uniform top-k). The expected rows are exact (a dynamic programme over
groups), every rank holding ``tokens`` tokens.

>>> rows = expected_rows(tokens=4, num_experts=4, top_k=2, ep=2, ep_rank=0)
>>> rows.sent, rows.received
(Fraction(10, 3), Fraction(10, 3))
>>> rows = rows_of_routing([[(0, 1), (0, 3)], [(2, 3), (1, 2)]], num_experts=4, ep_rank=0)
>>> rows.sent, rows.received
(Fraction(1, 1), Fraction(1, 1))
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from fractions import Fraction
from math import comb

from attrs import frozen

from moefn.plan.errors import PlanError

Routing = Sequence[Sequence[Sequence[int]]]  # per EP rank, per token: its top-k expert ids


@frozen
class DispatchRows:
    """Rows one rank sends and receives per dispatch (each way: results return the same rows),
    on the across-node hop (the whole EP group when flat) and within its node."""

    sent: Fraction
    received: Fraction
    sent_in_node: Fraction = Fraction(0)
    received_in_node: Fraction = Fraction(0)


def _check(num_experts: int, ep: int, ranks_per_node: int, ep_rank: int) -> None:
    if ep < 1 or num_experts % ep or ep % ranks_per_node or not 0 <= ep_rank < ep:
        raise PlanError.single("ep", "experts, ranks and nodes do not divide evenly",
                               f"{num_experts} experts, ep={ep}, ranks_per_node="
                               f"{ranks_per_node}, ep rank {ep_rank}",
                               "use ep dividing the experts and ranks_per_node dividing ep")


def rows_of_routing(routing: Routing, num_experts: int, ep_rank: int,
                    ranks_per_node: int = 1) -> DispatchRows:
    """Exact rows of EP rank ``ep_rank`` when rank ``s`` routes ``routing[s]`` (EP size
    ``len(routing)``)."""
    ep = len(routing)
    _check(num_experts, ep, ranks_per_node, ep_rank)
    local, per_node = num_experts // ep, ranks_per_node
    node, index = divmod(ep_rank, per_node)
    sent = received = sent_in = received_in = 0
    for source, tokens in enumerate(routing):
        for experts in tokens:
            ranks = {e // local for e in experts}
            nodes = {r // per_node for r in ranks}
            if source == ep_rank:
                sent += len(nodes - {node})
            elif source % per_node == index and node in nodes:
                received += 1
            if source % per_node != index or node not in nodes:
                continue  # the token's row for this node does not pass through this rank
            sent_in += len({r for r in ranks if r // per_node == node} - {ep_rank})
        for experts in tokens:  # rows other ranks of this node forward here
            ranks = {e // local for e in experts}
            if ep_rank in ranks and source % per_node != index:
                received_in += 1
    return DispatchRows(Fraction(sent), Fraction(received), Fraction(sent_in),
                        Fraction(received_in))


@functools.cache  # the layout search asks for the same ranges many times
def hit_probability(num_experts: int, top_k: int, first: int, count: int, n_group: int = 1,
                    topk_group: int = 1) -> Fraction:
    """Probability that a uniformly routed token picks an expert in ``[first, first + count)``.

    >>> hit_probability(8, 2, 0, 4)        # top-2 of 8: 1 - C(4,2)/C(8,2)
    Fraction(11, 14)
    >>> hit_probability(8, 2, 0, 4, n_group=2, topk_group=1)   # one group of two, chosen
    Fraction(1, 2)
    """
    if (n_group < 1 or num_experts % n_group or not 1 <= topk_group <= n_group
            or not 1 <= top_k <= topk_group * num_experts // n_group):
        raise PlanError.single("routing", "impossible group-limited routing",
                               f"{num_experts} experts, top_k={top_k}, n_group={n_group}, "
                               f"topk_group={topk_group}",
                               "use n_group dividing the experts and top_k <= topk_group·E/n_group")
    size = num_experts // n_group
    overlap = [max(0, min(first + count, (g + 1) * size) - max(first, g * size))
               for g in range(n_group)]
    # ways[c][m]: sets of c groups holding m experts of the range
    ways = [[0] * (count + 1) for _ in range(topk_group + 1)]
    ways[0][0] = 1
    for o in overlap:
        for c in range(topk_group, 0, -1):
            for m in range(count, o - 1, -1):
                ways[c][m] += ways[c - 1][m - o]
    pool = topk_group * size
    miss = sum((Fraction(w * comb(pool - m, top_k), comb(pool, top_k))
                for m, w in enumerate(ways[topk_group]) if w), Fraction(0))
    return 1 - miss / comb(n_group, topk_group)


@functools.lru_cache(maxsize=4096)  # pure; a plan asks once per MoE layer
def expected_rows(tokens: int, num_experts: int, top_k: int, ep: int, ep_rank: int,
                  ranks_per_node: int = 1, n_group: int = 1, topk_group: int = 1) -> DispatchRows:
    """Expected rows of EP rank ``ep_rank`` under uniform (group-limited) routing."""
    _check(num_experts, ep, ranks_per_node, ep_rank)
    local, per_node = num_experts // ep, ranks_per_node
    nodes = ep // per_node
    node, index = divmod(ep_rank, per_node)

    def hit(first_rank: int, ranks: int) -> Fraction:
        return hit_probability(num_experts, top_k, first_rank * local, ranks * local, n_group,
                               topk_group)

    in_node = [node * per_node + i for i in range(per_node)]
    return DispatchRows(
        sent=tokens * sum((hit(n * per_node, per_node) for n in range(nodes) if n != node),
                          Fraction(0)),
        received=(nodes - 1) * tokens * hit(node * per_node, per_node),
        sent_in_node=nodes * tokens * sum((hit(r, 1) for r in in_node if r != ep_rank),
                                          Fraction(0)),
        received_in_node=(per_node - 1) * nodes * tokens * hit(ep_rank, 1))
