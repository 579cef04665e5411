"""What the all-to-all dispatchers move on 4 gloo ranks, counted by `CommLedger`: equal to the
prediction for the routing they were given, equal on average to the plan's uniform expectation
(group-limited when the model's router is), and (hierarchical, 2 nodes of 2) one row per
(token, destination node) across nodes. Plus the
permutation's determinism under selective checkpointing with tied expert ids and weights."""

from __future__ import annotations

from collections.abc import Callable
from fractions import Fraction
from typing import Any

import torch
import torch.distributed as dist
from attrs import evolve
from torch import Tensor
from torch.distributed import ProcessGroup
from torch.utils.checkpoint import checkpoint

from moefn import MeshSpec, compose, plan_ep
from moefn.adapters.reference import MoETransformer, get_preset
from moefn.analyse.comm import a2a_dispatch_comm, group_ranks
from moefn.analyse.dispatch_rows import DispatchRows, rows_of_routing
from moefn.analyse.estimate import estimate
from moefn.analyse.ledger import CommLedger
from moefn.realize.activation_checkpointing import _selective_contexts
from moefn.realize.dispatch import Dispatcher, LocalExpertsFn
from moefn.realize.ep_dispatch import AllToAllDispatch, HierarchicalDispatch, destinations
from tests.ranks import RankPool

E, H, PER_NODE = 16, 4, 2
Counted = dict[tuple[str, tuple[int, ...]], tuple[int, int, int]]


def _scale_experts(scale: Tensor) -> LocalExpertsFn:
    """Expert ``e`` multiplies its rows by ``scale[e]`` (a differentiable stand-in)."""
    def local_fn(x_sorted: Tensor, counts: Tensor) -> Tensor:
        return x_sorted * torch.repeat_interleave(scale, counts, output_size=x_sorted.shape[0])[:, None]
    return local_fn


def draw(tokens: int, top_k: int, n_group: int, topk_group: int, gen: torch.Generator) -> Tensor:
    """Uniform group-limited routing: ``topk_group`` of ``n_group`` groups, then ``top_k``
    distinct experts among theirs, each choice uniform."""
    groups = torch.rand(tokens, n_group, generator=gen).topk(topk_group, dim=1).indices
    allowed = torch.zeros(tokens, n_group, dtype=torch.bool).scatter_(1, groups, True)
    scores = torch.rand(tokens, E, generator=gen)
    scores[~allowed.repeat_interleave(E // n_group, dim=1)] = -1.0
    return scores.topk(top_k, dim=1).indices


def _groups() -> dict[str, ProcessGroup]:
    made = {name: dist.new_group(list(members)) for name, members in
            (("across 0", (0, 2)), ("across 1", (1, 3)), ("within 0", (0, 1)),
             ("within 1", (2, 3)))}
    me = dist.get_rank()
    assert dist.group.WORLD is not None
    return {"ep": dist.group.WORLD, "across": made[f"across {me % PER_NODE}"],
            "within": made[f"within {me // PER_NODE}"]}


def _dispatchers(groups: dict[str, ProcessGroup]) -> dict[str, tuple[Dispatcher, int | None]]:
    return {"all_to_all": (AllToAllDispatch(E, groups["ep"]), None),
            "hierarchical": (HierarchicalDispatch(E, groups["across"], groups["within"]),
                             PER_NODE)}


def _step(dispatcher: Dispatcher, index: Tensor, gen: torch.Generator) -> Counted:
    """One forward and backward of ``dispatcher``, counted."""
    x = torch.randn(index.shape[0], H, generator=gen).requires_grad_()
    w = torch.rand(index.shape, generator=gen).requires_grad_()
    scale = torch.rand(E // dist.get_world_size(), generator=gen).requires_grad_()
    with CommLedger() as ledger:
        dispatcher(x, index, w, _scale_experts(scale)).sum().backward()
    return {key: (t.calls, t.sent, t.received) for key, t in ledger.totals().items()}


def _predicted(rows: DispatchRows, per_node: int | None, top_k: int,
               groups: dict[str, ProcessGroup]) -> Counted:
    """The prediction by group: the flat hop on the ep group, hierarchical hops on theirs."""
    out: dict[tuple[str, tuple[int, ...]], tuple[int, int, int]] = {}
    for c in a2a_dispatch_comm(rows, ("ep",), 4, per_node, top_k, H, 4, num_experts=E):
        group = {None: "ep", "across nodes": "across", "within node": "within"}[c.hop]
        key = ("all_to_all", tuple(dist.get_process_group_ranks(groups[group])))
        calls, sent, received = out.get(key, (0, 0, 0))
        out[key] = (calls + c.calls, sent + c.sent, received + c.received)
    return out


def _exact(rank: int, groups: dict[str, ProcessGroup]) -> None:
    """Prediction == ledger for given routings, uneven and zero token counts included."""
    gen = torch.Generator().manual_seed(rank)
    for tokens in ((5, 0, 9, 3), (7, 7, 7, 7)):
        routing = [draw(t, 3, 4, 2, torch.Generator().manual_seed(10 * r + t))
                   for r, t in enumerate(tokens)]
        table = [[tuple(row) for row in r.tolist()] for r in routing]
        for name, (dispatcher, per_node) in _dispatchers(groups).items():
            rows = rows_of_routing(table, E, rank, per_node or 1)
            measured = _step(dispatcher, routing[rank], gen)
            assert measured == _predicted(rows, per_node, 3, groups), (name, tokens)
            if per_node:  # across nodes: one row per (token, other destination node)
                node = rank // PER_NODE
                pairs = sum(len({e // (E // 2) for e in row} - {node}) for row in table[rank])
                assert rows.sent == pairs, (rows, pairs)


def _planned(rank: int, tokens: int, top_k: int, n_group: int, topk_group: int,
             per_node: int | None) -> Counted:
    """The plan's prediction for a one-layer reference model routing ``top_k`` of ``E`` experts
    within ``topk_group`` of ``n_group`` groups (its router's facts), by group."""
    config = evolve(get_preset("tiny"), n_layers=1, n_experts=E, top_k=top_k, n_group=n_group,
                    topk_group=topk_group)
    with torch.device("meta"):
        model = MoETransformer(config)
    stage = plan_ep(dispatch="hierarchical", ranks_per_node=per_node) if per_node else plan_ep()
    plan = compose(stage)(model, MeshSpec(dp_shard=4, ep=4)).unwrap()
    out: Counted = {}
    for c in estimate(plan, rank, tokens, hidden=H, activation_dtype="float32").comm:
        if c.op == "all_to_all":
            key = ("all_to_all", group_ranks(plan, rank, c))
            calls, sent, received = out.get(key, (0, 0, 0))
            out[key] = (calls + c.calls, sent + c.sent, received + c.received)
    return out


def _expected(rank: int, groups: dict[str, ProcessGroup], draws: int,
              tokens: int) -> dict[str, float]:
    """Relative gap between the ledger's mean bytes and the plan's uniform expectation."""
    gaps = {}
    for n_group, topk_group, top_k in ((1, 1, 2), (4, 2, 3)):
        gen = torch.Generator().manual_seed(1000 + rank)
        for name, (dispatcher, per_node) in _dispatchers(groups).items():
            total: dict[tuple[str, tuple[int, ...]], Fraction] = {}
            for _ in range(draws):
                for key, (_, sent, received) in _step(
                        dispatcher, draw(tokens, top_k, n_group, topk_group, gen), gen).items():
                    total[key] = total.get(key, Fraction(0)) + sent + received
            planned = _planned(rank, tokens, top_k, n_group, topk_group, per_node)
            assert planned.keys() == total.keys(), (planned, total)
            for key, (_, sent, received) in planned.items():
                mean = total[key] / draws
                gaps[f"{name} {n_group}/{topk_group} {key}"] = float(
                    abs(mean - (sent + received)) / (sent + received))
    return gaps


def _ties_under_selective_checkpoint(rank: int, groups: dict[str, ProcessGroup]) -> None:
    """Every token picks the same experts with the same weights (ties everywhere): selective
    checkpointing keeps the collectives' and matmuls' results and recomputes the permutations;
    gradients equal those of the plain run and of one process."""
    tokens = (6, 0, 5, 9)
    index = torch.tensor([[9, 1, 8, 0]]).repeat(tokens[rank], 1)  # experts on ranks 2, 0, 2, 0
    for name, (dispatcher, _) in _dispatchers(groups).items():
        grads = []
        for mode in ("plain", "selective"):
            gen = torch.Generator().manual_seed(rank)
            x = torch.randn(tokens[rank], H, generator=gen).requires_grad_()
            w = torch.full(index.shape, 0.25, requires_grad=True)
            weight = torch.randn(E // 4, H, H, generator=torch.Generator().manual_seed(rank),
                                 requires_grad=True)

            def local_fn(x_sorted: Tensor, counts: Tensor, weight: Tensor = weight) -> Tensor:
                chunks = torch.split(x_sorted, counts.tolist())
                return torch.cat([c @ m for c, m in zip(chunks, weight, strict=True)])

            def run(x: Tensor, w: Tensor, dispatcher: Dispatcher = dispatcher,
                    local_fn: LocalExpertsFn = local_fn) -> Tensor:
                return dispatcher(x, index, w, local_fn).tanh()

            y = run(x, w) if mode == "plain" else checkpoint(
                run, x, w, use_reentrant=False, context_fn=_selective_contexts)
            (y * torch.arange(y.numel()).view_as(y)).sum().backward()
            assert x.grad is not None and w.grad is not None and weight.grad is not None
            grads.append((y.detach(), x.grad, w.grad, weight.grad))
        for a, b in zip(*grads, strict=True):
            assert torch.equal(a, b), name


def _all(rank: int, world: int, draws: int, tokens: int) -> dict[str, float]:
    groups = _groups()
    _exact(rank, groups)
    _ties_under_selective_checkpoint(rank, groups)
    return _expected(rank, groups, draws, tokens)


def test_dispatch_bytes(ranks: Callable[[int], RankPool]) -> None:
    for rank, gaps in enumerate(ranks(4).run(_all, 10, 4096)):
        worst = max(gaps.items(), key=lambda kv: kv[1])
        assert worst[1] < 0.01, (rank, worst)
        assert len(gaps) == 2 * (1 + 2), gaps  # 2 routings × (1 flat + 2 hierarchical groups)


def test_destinations_keep_token_order_within_each_destination() -> None:
    index = torch.tensor([[3, 3], [0, 2], [1, 1], [3, 0], [-1, 2]])
    dest, token = destinations(index, 0, 2, 2)
    assert dest.tolist() == [0, 0, 0, 1, 1, 1, 1]
    assert token.tolist() == [1, 2, 3, 0, 1, 3, 4]


def test_slots_of_one_expert_keep_row_order() -> None:
    """Ties (many slots of one expert) keep row order: the permutation a recompute rebuilds."""
    from moefn.realize.ep_dispatch import run_local_slots

    ids = torch.tensor([[1, 0], [0, 1], [1, 0], [0, 1], [1, 1], [0, 0], [1, 0], [0, 1], [1, 0],
                        [0, 1], [1, 1]])
    seen: list[Any] = []

    def record(x_sorted: Tensor, counts: Tensor) -> Tensor:
        seen.append((x_sorted[:, 0].tolist(), counts.tolist()))
        return x_sorted

    rows = torch.arange(len(ids), dtype=torch.float32)[:, None]
    run_local_slots(rows, torch.ones(ids.shape), ids, 0, 2, record)
    flat = ids.reshape(-1).tolist()
    stable = [float(i // 2) for e in (0, 1) for i, v in enumerate(flat) if v == e]
    assert seen == [(stable, [flat.count(0), flat.count(1)])]
