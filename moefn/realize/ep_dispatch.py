"""Expert-parallel dispatchers: tokens travel to the rank that owns their expert and back.

Rank ``r`` of an expert-parallel group of size ``ep`` owns the global experts
``[r * E / ep, (r + 1) * E / ep)``; ``local_fn`` runs only those. All classes satisfy the
`moefn.realize.dispatch.Dispatcher` protocol and are differentiable end to end (gradients reach
the tokens, the routing weights and the local experts' parameters). Every rank of the group must
call them (and run backward) the same number of times; token counts may differ per rank.

The all-to-all dispatchers send a token once per destination (not once per chosen expert): the
row carries the token, its ``K`` routing weights and its expert ids (``-1`` for slots that go
elsewhere, stored bitwise in the row's dtype: `moefn.realize.expert_ids`); the destination
applies the weights and returns one summed row. Row orders come from
``nonzero`` and stable sorts only, so a recompute (selective checkpointing keeps the collectives'
results and recomputes the permutations) rebuilds exactly the forward's order, ties included.

>>> import torch
>>> from moefn.launch import one_rank_group
>>> x, top_k_weights = torch.randn(3, 4), torch.full((3, 2), 0.5)  # 3 tokens, 2 experts each
>>> top_k_index = torch.tensor([[0, 1], [2, 3], [1, 2]])
>>> def double(x_sorted: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
...     return 2 * x_sorted  # this rank's experts, on their tokens sorted by expert
>>> with one_rank_group() as group:
...     a = AllToAllDispatch(num_experts=4, group=group)(x, top_k_index, top_k_weights, double)
...     b = AllGatherDispatch(num_experts=4, group=group)(x, top_k_index, top_k_weights, double)
>>> torch.allclose(a, 2 * x) and torch.allclose(b, 2 * x)
True
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import Tensor
from torch.distributed import ProcessGroup

from moefn.realize.dispatch import LocalExpertsFn, sort_by_expert
from moefn.realize.expert_ids import from_columns, to_columns

Inner = Callable[[Tensor, Tensor], Tensor]  # (rows [P, H+K], expert ids [P, K]) -> [P, H]


def _experts_per_rank(num_experts: int, size: int) -> int:
    if num_experts % size != 0:
        raise ValueError(
            f"num_experts={num_experts} is not divisible by the expert-parallel group size {size}"
        )
    return num_experts // size


def _wait(t: Tensor) -> Tensor:
    """Block on a functional collective's result and unwrap it into a plain tensor."""
    out: Tensor = funcol.wait_tensor(t)  # type: ignore[no-untyped-call]
    return out


def _all_to_all(x: Tensor, output_splits: list[int], input_splits: list[int],
                group: ProcessGroup) -> Tensor:
    """Differentiable uneven all-to-all along dim 0 (backward swaps the splits)."""
    return _wait(funcol.all_to_all_single_autograd(x, output_splits, input_splits, group))


def destinations(index: Tensor, first: int, per_destination: int, size: int) -> tuple[Tensor, Tensor]:
    """One pair per (token, destination) that any of the token's experts lives on:
    ``(destination[P], token[P])`` ordered by destination, then token (``nonzero``'s row-major
    order, deterministic). Expert ``e`` lives on ``(e - first) // per_destination``; ids
    outside ``[first, first + size * per_destination)`` (e.g. ``-1``) go nowhere.

    >>> destinations(torch.tensor([[0, 1], [3, 0], [-1, 2]]), 0, 2, 2)
    (tensor([0, 0, 1, 1]), tensor([0, 1, 1, 2]))
    """
    tokens = index.shape[0]
    dest = torch.div(index - first, per_destination, rounding_mode="floor")
    dest = torch.where((index >= first) & (dest < size), dest, size)  # `size`: nowhere
    hit = torch.zeros(tokens, size + 1, dtype=torch.bool, device=index.device)
    hit.scatter_(1, dest, True)
    pairs = hit[:, :size].t().nonzero()
    return pairs[:, 0], pairs[:, 1]


def _hop(packed: Tensor, index: Tensor, first: int, per_destination: int, group: ProcessGroup,
         inner: Inner, num_experts: int) -> Tensor:
    """Send each token's row once to every group rank holding one of its experts, run ``inner``
    there on the received rows (with the ids of the experts that rank holds, ``-1`` elsewhere),
    and sum the returned rows per token: ``[T, H]`` in ``inner``'s dtype. The ids travel as
    extra columns of the rows (`moefn.realize.expert_ids`): one all-to-all of counts, one of
    rows, one of results."""
    size = dist.get_world_size(group)
    dest, token = destinations(index, first, per_destination, size)
    send_counts = torch.bincount(dest, minlength=size)
    # functional, so that selective checkpointing saves them rather than running them again
    recv_counts = _wait(funcol.all_to_all_single(send_counts, None, None, group))
    send, recv = send_counts.tolist(), recv_counts.tolist()
    ids = index[token]
    owner = torch.div(ids - first, per_destination, rounding_mode="floor")
    ids = torch.where((ids >= first) & (owner == dest.unsqueeze(1)), ids, -1)
    width = packed.shape[1]
    rows = torch.cat([packed[token], to_columns(ids, num_experts, packed.dtype)], dim=1)
    received = _all_to_all(rows, recv, send, group)
    recv_ids = from_columns(received[:, width:], index.shape[1], num_experts)
    returned = _all_to_all(inner(received[:, :width], recv_ids), send, recv, group)
    return returned.new_zeros(index.shape[0], returned.shape[1]).index_add(0, token, returned)


def run_local_slots(rows: Tensor, weights: Tensor, ids: Tensor, first: int, local: int,
                    local_fn: LocalExpertsFn) -> Tensor:
    """``out[p] = Σ_k weights[p, k] · expert_{ids[p, k]}(rows[p])`` over the slots whose expert
    is local (``first <= id < first + local``); other slots add nothing. Slots are grouped by
    local expert with a stable sort (ties keep row order).

    >>> double = lambda x, counts: 2 * x
    >>> run_local_slots(torch.ones(2, 1), torch.tensor([[0.5, 1.0], [1.0, 1.0]]),
    ...                 torch.tensor([[4, 5], [9, -1]]), 4, 2, double)
    tensor([[3.],
            [0.]])
    """
    k = ids.shape[1]
    flat = ids.reshape(-1)
    mine = (flat >= first) & (flat < first + local)
    # experts of other ranks sort last under the key `local`
    order, counts = sort_by_expert(torch.where(mine, flat - first, local), local + 1)
    slots = order[: int(counts[:local].sum())]
    y_local = local_fn(rows[slots // k], counts[:local].cpu())
    weighted = y_local * weights.reshape(-1)[slots].unsqueeze(-1).to(y_local.dtype)
    return torch.zeros(rows.shape[0], y_local.shape[1], dtype=y_local.dtype,
                       device=rows.device).index_add(0, slots // k, weighted)


def _experts_here(hidden: int, first: int, local: int, local_fn: LocalExpertsFn) -> Inner:
    """The innermost step: this rank's experts on received rows ``[token, weights]``."""
    def run(received: Tensor, ids: Tensor) -> Tensor:
        return run_local_slots(received[:, :hidden], received[:, hidden:], ids, first, local,
                               local_fn)
    return run


def _pack(x: Tensor, top_k_weights: Tensor) -> Tensor:
    """Rows ``[token, routing weights]`` in ``x.dtype``: the weights travel with their token."""
    return torch.cat([x, top_k_weights.to(x.dtype)], dim=1)


class _OneGroupDispatch:
    """Experts split evenly over the ranks of one expert-parallel group."""

    def __init__(self, num_experts: int, group: ProcessGroup) -> None:
        self.experts_per_rank = _experts_per_rank(num_experts, dist.get_world_size(group))
        self.num_experts = num_experts
        self.group = group

    def _first_expert(self) -> int:
        return dist.get_rank(self.group) * self.experts_per_rank


class AllToAllDispatch(_OneGroupDispatch):
    """Send each token once to every rank holding one of its experts, with an uneven
    all-to-all, and get one weighted sum back per (token, rank).

    Per call a rank sends one row of ``H + K + C`` in ``x.dtype`` (token, routing weights and
    ``C = id_columns(K, E, itemsize)`` columns of expert ids) per (token, destination rank), and
    gets one row of ``H`` back per pair; counts travel as ``ep`` int64 values. Backward returns
    the rows' gradients (weights and id columns included) and sends the results' gradients."""

    def __call__(
        self, x: Tensor, top_k_index: Tensor, top_k_weights: Tensor, local_fn: LocalExpertsFn
    ) -> Tensor:
        local = self.experts_per_rank
        here = _experts_here(x.shape[1], self._first_expert(), local, local_fn)
        return _hop(_pack(x, top_k_weights), top_k_index, 0, local, self.group, here,
                    self.num_experts).to(x.dtype)


class HierarchicalDispatch:
    """Two-level all-to-all for an EP group spanning nodes: each token crosses once to every
    node holding one of its experts (to the rank with the same in-node index there), which
    fans it out to the node's ranks that hold them; results come back the same way, summed.

    ``across`` joins the ranks with this rank's in-node index (one per node, in node order),
    ``within`` the ranks of this rank's node; EP rank ``node * R + i`` owns the experts as in
    `AllToAllDispatch` (``R`` = ranks per node). Rows and ids are those of `AllToAllDispatch`."""

    def __init__(self, num_experts: int, across: ProcessGroup, within: ProcessGroup) -> None:
        nodes, per_node = dist.get_world_size(across), dist.get_world_size(within)
        self.experts_per_rank = _experts_per_rank(num_experts, nodes * per_node)
        self.num_experts = num_experts
        self.across, self.within = across, within

    def __call__(
        self, x: Tensor, top_k_index: Tensor, top_k_weights: Tensor, local_fn: LocalExpertsFn
    ) -> Tensor:
        local, per_node = self.experts_per_rank, dist.get_world_size(self.within)
        node, i = dist.get_rank(self.across), dist.get_rank(self.within)
        node_first = node * per_node * local
        here = _experts_here(x.shape[1], node_first + i * local, local, local_fn)

        def fan_out(received: Tensor, ids: Tensor) -> Tensor:
            return _hop(received, ids, node_first, local, self.within, here, self.num_experts)

        return _hop(_pack(x, top_k_weights), top_k_index, 0, per_node * local, self.across,
                    fan_out, self.num_experts).to(x.dtype)


class AllGatherDispatch(_OneGroupDispatch):
    """All-gather every rank's tokens, run the local experts, reduce-scatter the weighted sums.

    Ranks may hold different token counts; they are padded to the group maximum ``T_max``.
    Routing weights travel with the tokens (in ``x.dtype``) and are applied on the expert's
    rank, so the reduce-scatter carries ``ep * T_max`` rows of ``H``, not one per (token, k)."""

    def __call__(
        self, x: Tensor, top_k_index: Tensor, top_k_weights: Tensor, local_fn: LocalExpertsFn
    ) -> Tensor:
        local, hidden = self.experts_per_rank, x.shape[1]
        tokens = top_k_index.shape[0]
        sizes = funcol.all_gather_single(torch.tensor([tokens], device=x.device), 0, self.group)
        pad = int(sizes.max()) - tokens
        # tokens and weights share one differentiable gather; padded slots route nowhere (-1)
        packed = _wait(funcol.all_gather_single_autograd(
            torch.nn.functional.pad(_pack(x, top_k_weights), (0, 0, 0, pad)), 0, self.group))
        index = _wait(funcol.all_gather_single(
            torch.nn.functional.pad(top_k_index, (0, 0, 0, pad), value=-1), 0, self.group))
        summed = run_local_slots(packed[:, :hidden], packed[:, hidden:], index,
                                 self._first_expert(), local, local_fn)
        out = _wait(funcol.reduce_scatter_single_autograd(summed, "sum", 0, self.group))
        if pad:  # a copy, not a view: FSDP cannot safely hook a view an experts unit returns
            out = out[:tokens].clone()
        return out.to(x.dtype)
