"""Token dispatch: route each token to its top-k experts and combine the results.

A dispatcher is a callable ``(x[T,H], top_k_index[T,K], top_k_weights[T,K], local_fn) -> [T,H]``
where ``local_fn(x_sorted[N,H], counts[E_local]) -> y_sorted[N,H]`` runs this rank's experts on
tokens already grouped by local expert (``counts`` is an int64 CPU tensor).

>>> d = LocalDispatch(num_experts=4)
>>> # y = d(x, idx, w, experts.local_fn)
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor


class LocalExpertsFn(Protocol):
    def __call__(self, x_sorted: Tensor, counts: Tensor) -> Tensor: ...


class Dispatcher(Protocol):
    num_experts: int

    def __call__(
        self, x: Tensor, top_k_index: Tensor, top_k_weights: Tensor, local_fn: LocalExpertsFn
    ) -> Tensor: ...


def sort_by_expert(top_k_index: Tensor, num_experts: int) -> tuple[Tensor, Tensor]:
    """Order of the flattened (token, k) slots grouped by expert, and tokens per expert.

    Returns ``(order[T*K], counts[E])``; ``order`` is stable so ties keep token order.
    """
    flat = top_k_index.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_experts)
    return order, counts


def combine(y_slots: Tensor, order: Tensor, top_k_weights: Tensor, dtype: torch.dtype) -> Tensor:
    """Un-permute expert outputs (row ``i`` belongs to slot ``order[i]``) and weight-sum over k."""
    tokens, k = top_k_weights.shape
    y = torch.empty_like(y_slots).index_copy(0, order, y_slots)
    weighted = y.view(tokens, k, y.shape[-1]) * top_k_weights.unsqueeze(-1).to(y.dtype)
    return weighted.sum(dim=1).to(dtype)


class LocalDispatch:
    """No expert parallelism: every expert lives on this rank."""

    def __init__(self, num_experts: int) -> None:
        self.num_experts = num_experts

    def __call__(
        self, x: Tensor, top_k_index: Tensor, top_k_weights: Tensor, local_fn: LocalExpertsFn
    ) -> Tensor:
        tokens, k = top_k_index.shape
        order, counts = sort_by_expert(top_k_index, self.num_experts)
        x_sorted = x[order // k]
        return combine(local_fn(x_sorted, counts.cpu()), order, top_k_weights, x.dtype)
