"""Expert-parallel dispatchers on real gloo ranks match `LocalDispatch` over all ranks' tokens."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor
from torch.distributed import ProcessGroup

from moefn.realize.dispatch import Dispatcher, LocalDispatch, LocalExpertsFn
from moefn.realize.ep_dispatch import AllGatherDispatch, AllToAllDispatch, HierarchicalDispatch
from tests.ranks import RankPool

E, H, INTER, K = 8, 16, 8, 2
Factory = Callable[[int, ProcessGroup, dict[tuple[int, ...], ProcessGroup]], Dispatcher]


def _hierarchical(per_node: int) -> Factory:
    """Two-level dispatch over ``ep_group`` seen as nodes of ``per_node`` consecutive ranks."""
    def make(num_experts: int, ep_group: ProcessGroup,
             subgroups: dict[tuple[int, ...], ProcessGroup]) -> Dispatcher:
        members = dist.get_process_group_ranks(ep_group)
        i = members.index(dist.get_rank())
        across = tuple(members[i % per_node::per_node])
        within = tuple(members[i - i % per_node:i - i % per_node + per_node])
        return HierarchicalDispatch(num_experts, subgroups[across], subgroups[within])
    return make


DISPATCHERS: dict[str, Factory] = {
    "all_to_all": lambda n, group, _: AllToAllDispatch(n, group),
    "all_gather": lambda n, group, _: AllGatherDispatch(n, group),
    "hierarchical 2 per node": _hierarchical(2),
    "hierarchical 1 per node": _hierarchical(1),
}


@dataclass(frozen=True)
class Case:
    tokens: tuple[int, ...]  # tokens on each of the 4 ranks
    own_only: tuple[int, ...] = ()  # ranks that route only to their own experts


CASES = [
    Case(tokens=(5, 3, 7, 4)),
    Case(tokens=(6, 0, 4, 5)),  # a rank without tokens
    Case(tokens=(4, 10, 9, 3), own_only=(0, 3)),  # ranks that send nothing to some peers
]


Groups = tuple[ProcessGroup, ProcessGroup | None, dict[tuple[int, ...], ProcessGroup]]


def _groups(ep: int, rank: int, world_size: int) -> Groups:
    """(expert-parallel group, group of ranks holding the same experts or None if alone, every
    group by its ranks); collective: every rank creates the same groups in the same order."""
    subgroups = {members: dist.new_group(list(members))
                 for members in ((0,), (1,), (2,), (3,), (0, 1), (2, 3), (0, 2), (1, 3))}
    assert dist.group.WORLD is not None
    subgroups[(0, 1, 2, 3)] = dist.group.WORLD
    if ep == world_size:
        return dist.group.WORLD, None, subgroups
    first = rank - rank % ep
    return subgroups[(first, first + 1)], subgroups[(rank % ep, rank % ep + ep)], subgroups


def _swiglu_experts(gate_up: Tensor, down: Tensor) -> LocalExpertsFn:
    def local_fn(x_sorted: Tensor, counts: Tensor) -> Tensor:
        assert counts.dtype == torch.int64 and counts.device.type == "cpu"
        assert counts.shape == (gate_up.shape[0],) and int(counts.sum()) == x_sorted.shape[0]
        chunks = torch.split(x_sorted, counts.tolist())
        # empty chunks too, so every expert stays in the graph
        return torch.cat([(F.silu(c @ gu[:, :INTER]) * (c @ gu[:, INTER:])) @ d
                          for c, gu, d in zip(chunks, gate_up, down, strict=True)])
    return local_fn


class Data(NamedTuple):
    gate_up: Tensor  # [E, H, 2*INTER], all experts
    down: Tensor  # [E, INTER, H]
    xs: list[Tensor]  # per rank: tokens [T, H], top-k ids [T, K], weights [T, K], d loss/d y
    idxs: list[Tensor]
    ws: list[Tensor]
    gs: list[Tensor]


def _data(case: Case, ep: int, seed: int) -> Data:
    gen = torch.Generator().manual_seed(seed)
    gate_up = torch.randn(E, H, 2 * INTER, generator=gen) * 0.3
    down = torch.randn(E, INTER, H, generator=gen) * 0.3
    xs, idxs, ws, gs = [], [], [], []
    for rank, tokens in enumerate(case.tokens):
        first = (rank % ep) * (E // ep)
        allowed = torch.arange(first, first + E // ep) if rank in case.own_only else torch.arange(E)
        xs.append(torch.randn(tokens, H, generator=gen))
        idxs.append(torch.stack([allowed[torch.randperm(len(allowed), generator=gen)[:K]]
                                 for _ in range(tokens)]) if tokens else torch.zeros(0, K).long())
        ws.append(torch.rand(tokens, K, generator=gen) + 0.1)
        gs.append(torch.randn(tokens, H, generator=gen))
    assert torch.cat(idxs).unique().numel() == E, "every expert needs a token to test its grad"
    return Data(gate_up, down, xs, idxs, ws, gs)


def _leaf(t: Tensor) -> Tensor:
    return t.clone().requires_grad_()


@torch.no_grad()
def _close(actual: Tensor, expected: Tensor, what: str) -> None:
    assert actual.shape == expected.shape, f"{what}: {actual.shape} != {expected.shape}"
    err = float((actual - expected).norm() / expected.norm().clamp_min(1e-30))
    assert err <= 1e-5, f"{what}: relative error {err:.2e}"


def _nonzero_per_expert(grad: Tensor, what: str) -> None:
    assert bool((grad.flatten(1).abs().sum(1) > 0).all()), f"{what}: an expert got zero grad"


def _check_case(rank: int, groups: Groups, ep: int, name: str, case: Case, seed: int) -> None:
    gate_up, down, xs, idxs, ws, gs = _data(case, ep, seed)

    ref_x, ref_w = _leaf(torch.cat(xs)), _leaf(torch.cat(ws))
    ref_gu, ref_down = _leaf(gate_up), _leaf(down)
    ref_y = LocalDispatch(E)(ref_x, torch.cat(idxs), ref_w, _swiglu_experts(ref_gu, ref_down))
    (ref_y * torch.cat(gs)).sum().backward()

    ep_group, dp_group, subgroups = groups
    lo = dist.get_rank(ep_group) * (E // ep)
    x, w = _leaf(xs[rank]), _leaf(ws[rank])
    gu, dn = _leaf(gate_up[lo:lo + E // ep]), _leaf(down[lo:lo + E // ep])
    dispatcher = DISPATCHERS[name](E, ep_group, subgroups)
    y = dispatcher(x, idxs[rank], w, _swiglu_experts(gu, dn))
    (y * gs[rank]).sum().backward()

    start = sum(case.tokens[:rank])
    mine = slice(start, start + case.tokens[rank])
    assert x.grad is not None and w.grad is not None
    assert ref_x.grad is not None and ref_w.grad is not None
    _close(y, ref_y[mine], "output")
    _close(x.grad, ref_x.grad[mine], "grad x")
    _close(w.grad, ref_w.grad[mine], "grad top_k_weights")
    if case.tokens[rank]:
        assert bool(x.grad.abs().sum(1).gt(0).all()) and bool(w.grad.ne(0).all())
    for local, ref, what in ((gu, ref_gu, "grad gate_up"), (dn, ref_down, "grad down")):
        assert local.grad is not None and ref.grad is not None
        total = local.grad.clone()
        if dp_group is not None:
            dist.all_reduce(total, group=dp_group)
        _close(total, ref.grad[lo:lo + E // ep], what)
        _nonzero_per_expert(total, what)


def _run_cases(rank: int, world_size: int, ep: int, name: str) -> None:
    groups = _groups(ep, rank, world_size)
    for seed, case in enumerate(CASES):
        _check_case(rank, groups, ep, name, case, seed)
    ep_group, _, subgroups = groups
    with pytest.raises(ValueError, match=f"num_experts={2 * ep - 1} .* size {ep}"):
        DISPATCHERS[name](2 * ep - 1, ep_group, subgroups)


@pytest.mark.parametrize("name", sorted(DISPATCHERS))
@pytest.mark.parametrize("ep", [2, 4])
def test_matches_local_dispatch(ranks: Callable[[int], RankPool], ep: int, name: str) -> None:
    ranks(4).run(_run_cases, ep, name)
