"""Expert-parallel dispatchers: tokens travel to the rank that owns their expert and back.

Rank ``r`` of an expert-parallel group of size ``ep`` owns the global experts
``[r * E / ep, (r + 1) * E / ep)``; ``local_fn`` runs only those. Both classes satisfy the
`moefn.realize.dispatch.Dispatcher` protocol and are differentiable end to end (gradients reach
the tokens, the routing weights and the local experts' parameters). Every rank of the group must
call them (and run backward) the same number of times; token counts may differ per rank.

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

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import Tensor
from torch.distributed import ProcessGroup

from moefn.realize.dispatch import LocalExpertsFn, combine, sort_by_expert


def _experts_per_rank(num_experts: int, group: ProcessGroup) -> int:
    size = dist.get_world_size(group)
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


class AllToAllDispatch:
    """Send each (token, k) slot to its expert's rank with an uneven all-to-all, and back.

    Per call a rank sends its ``T*K`` slot rows of ``H`` and gets as many results back; in
    between it receives and returns the ``R`` rows routed to its experts. Counts travel as
    ``E`` int64 values; backward repeats both row exchanges for the gradients."""

    def __init__(self, num_experts: int, group: ProcessGroup) -> None:
        self.experts_per_rank = _experts_per_rank(num_experts, group)
        self.num_experts = num_experts
        self.group = group

    def __call__(
        self, x: Tensor, top_k_index: Tensor, top_k_weights: Tensor, local_fn: LocalExpertsFn
    ) -> Tensor:
        ep, local = dist.get_world_size(self.group), self.experts_per_rank
        k = top_k_index.shape[1]
        order, counts = sort_by_expert(top_k_index, self.num_experts)
        # recv_counts[s * local + e]: rows rank s sends to our local expert e
        # functional, so that selective checkpointing saves it rather than running it again
        recv_counts = _wait(funcol.all_to_all_single(counts, None, None, self.group))
        send_splits = counts.view(ep, local).sum(dim=1).tolist()
        recv_splits = recv_counts.view(ep, local).sum(dim=1).tolist()
        received = _all_to_all(x[order // k], recv_splits, send_splits, self.group)
        # received rows come as [source rank][local expert]; local_fn wants [local expert][source]
        block = torch.repeat_interleave(torch.arange(ep * local, device=x.device), recv_counts,
                                        output_size=received.shape[0])
        regroup = torch.argsort((block % local) * ep + block // local, stable=True)
        y_local = local_fn(received[regroup], recv_counts.view(ep, local).sum(dim=0).cpu())
        y_received = torch.empty_like(y_local).index_copy(0, regroup, y_local)
        y_slots = _all_to_all(y_received, send_splits, recv_splits, self.group)
        return combine(y_slots, order, top_k_weights, x.dtype)


class AllGatherDispatch:
    """All-gather every rank's tokens, run the local experts, reduce-scatter the weighted sums.

    Ranks may hold different token counts; they are padded to the group maximum ``T_max``.
    Routing weights travel with the tokens (in ``x.dtype``) and are applied on the expert's
    rank, so the reduce-scatter carries ``ep * T_max`` rows of ``H``, not one per (token, k)."""

    def __init__(self, num_experts: int, group: ProcessGroup) -> None:
        self.experts_per_rank = _experts_per_rank(num_experts, group)
        self.num_experts = num_experts
        self.group = group

    def __call__(
        self, x: Tensor, top_k_index: Tensor, top_k_weights: Tensor, local_fn: LocalExpertsFn
    ) -> Tensor:
        local, hidden = self.experts_per_rank, x.shape[1]
        tokens, k = top_k_index.shape
        sizes = funcol.all_gather_single(torch.tensor([tokens], device=x.device), 0, self.group)
        pad = int(sizes.max()) - tokens
        # tokens and weights share one differentiable gather; padded slots route nowhere (-1)
        packed = torch.cat([x, top_k_weights.to(x.dtype)], dim=1)
        packed = _wait(funcol.all_gather_single_autograd(
            torch.nn.functional.pad(packed, (0, 0, 0, pad)), 0, self.group))
        index = _wait(funcol.all_gather_single(
            torch.nn.functional.pad(top_k_index, (0, 0, 0, pad), value=-1), 0, self.group))
        x_all, w_all = packed[:, :hidden], packed[:, hidden:]
        first = dist.get_rank(self.group) * local
        flat = index.reshape(-1)
        mine = (flat >= first) & (flat < first + local)
        # experts of other ranks (and padding) sort last under the key `local`
        order, counts = sort_by_expert(torch.where(mine, flat - first, local), local + 1)
        slots = order[: int(counts[:local].sum())]
        y_local = local_fn(x_all[slots // k], counts[:local].cpu())
        weighted = y_local * w_all.reshape(-1)[slots].unsqueeze(-1).to(y_local.dtype)
        summed = torch.zeros(
            index.shape[0], y_local.shape[1], dtype=y_local.dtype, device=x.device
        ).index_add(0, slots // k, weighted)
        out = _wait(funcol.reduce_scatter_single_autograd(summed, "sum", 0, self.group))
        if pad:  # a copy, not a view: FSDP cannot safely hook a view an experts unit returns
            out = out[:tokens].clone()
        return out.to(x.dtype)
