"""The MoE feed-forward: a top-k router (softmax/sigmoid, optional expert bias) and fused experts.

>>> from moefn.adapters.reference.presets import get_preset
>>> moe = MoE(get_preset("tiny"))
>>> moe(torch.randn(2, 3, 32)).shape
torch.Size([2, 3, 32])
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from moefn.adapters.reference.config import MoEConfig
from moefn.adapters.reference.layers import DenseMLP
from moefn.grouped_experts import ExpertsImpl, run_grouped_experts
from moefn.realize.dispatch import Dispatcher, LocalDispatch
from moefn.realize.routing_tape import is_recomputing, route


class Router(nn.Module):
    """Scores ``x @ weight.T``, picks the top-k by score (+ expert bias) within the best
    ``topk_group`` of ``n_group`` expert groups, counts routed slots.

    ``tokens_per_expert`` accumulates the (token, k) slots sent to each expert; forwards
    recomputed by activation checkpointing (during backward) are not counted twice.

    >>> from moefn.adapters.reference.presets import get_preset
    >>> router = Router(get_preset("tiny"))
    >>> _ = nn.init.normal_(router.weight)
    >>> index, weights = router(torch.randn(5, 32))
    >>> index.shape, weights.shape, int(router.tokens_per_expert.sum())
    (torch.Size([5, 2]), torch.Size([5, 2]), 10)
    """

    def __init__(self, config: MoEConfig) -> None:
        super().__init__()
        self.top_k, self.score_func = config.top_k, config.score_func
        self.n_group, self.topk_group = config.n_group, config.topk_group
        self.keep_fp32: bool = config.router_fp32
        self.weight = nn.Parameter(torch.empty(config.n_experts, config.hidden))
        self.expert_bias: Tensor | None
        if config.expert_bias:
            self.register_buffer("expert_bias", torch.zeros(config.n_experts,
                                                            dtype=torch.float32))
        else:
            self.expert_bias = None
        self.tokens_per_expert: Tensor
        self.register_buffer("tokens_per_expert",
                             torch.zeros(config.n_experts, dtype=torch.float32), persistent=False)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        dtype = torch.float32 if self.keep_fp32 else x.dtype
        logits = x.to(dtype) @ self.weight.to(dtype).t()
        scores = logits.softmax(-1) if self.score_func == "softmax" else logits.sigmoid()
        choice = scores if self.expert_bias is None else scores + self.expert_bias
        index = route(self._within_groups(choice) if self.n_group > 1 else choice, self.top_k)
        weights = scores.gather(-1, index)
        if self.score_func == "sigmoid":
            weights = weights / weights.sum(-1, keepdim=True)
        with torch.no_grad():
            # the same ops on recompute (checkpointing replays ops by position), adding zero
            counts = torch.bincount(index.flatten(), minlength=self.tokens_per_expert.numel())
            scale = 0.0 if is_recomputing() else 1.0
            self.tokens_per_expert.add_(counts.to(self.tokens_per_expert.dtype), alpha=scale)
        return index, weights.to(x.dtype)

    def _within_groups(self, choice: Tensor) -> Tensor:
        """``choice`` at -inf outside each token's ``topk_group`` groups whose two best
        experts score highest (DeepSeek-V3's group-limited routing).

        >>> from attrs import evolve
        >>> from moefn.adapters.reference.presets import get_preset
        >>> router = Router(evolve(get_preset("tiny"), n_group=4, topk_group=1))  # pairs
        >>> router._within_groups(torch.tensor([[.1, .9, .5, .6, 0., 0., .2, .3]]))
        tensor([[  -inf,   -inf, 0.5000, 0.6000,   -inf,   -inf,   -inf,   -inf]])
        """
        grouped = choice.detach().reshape(*choice.shape[:-1], self.n_group, -1)
        best = grouped.topk(min(2, grouped.shape[-1]), dim=-1).values.sum(-1)
        kept = torch.zeros_like(best, dtype=torch.bool).scatter_(
            -1, best.topk(self.topk_group, dim=-1).indices, True)
        return grouped.masked_fill(~kept[..., None], float("-inf")).flatten(-2)


def _local(weight: Tensor) -> Tensor:
    """This rank's shard of an expert-parallel DTensor weight, else the weight (DTensors alone
    have ``to_local``; importing DTensor here would cost every planning run ~0.8 s)."""
    to_local = getattr(weight, "to_local", None)
    local: Tensor = to_local() if to_local is not None else weight
    return local


class GroupedExperts(nn.Module):
    """Fused SwiGLU experts ``gate_up[E,H,2I]``, ``down[E,I,H]``, reached via ``dispatcher``.

    Expert parallelism replaces ``dispatcher`` and shards the parameters on dim 0 (DTensors);
    `local_fn` then runs only this rank's shard.

    >>> from moefn.adapters.reference.presets import get_preset
    >>> experts = GroupedExperts(get_preset("tiny"))
    >>> x, index = torch.randn(3, 32), torch.tensor([[0, 1], [1, 7], [2, 0]])
    >>> experts(x, index, torch.full((3, 2), 0.5)).shape
    torch.Size([3, 32])
    """

    def __init__(self, config: MoEConfig) -> None:
        super().__init__()
        e, h, i = config.n_experts, config.hidden, config.moe_intermediate
        self.impl: ExpertsImpl = config.experts_impl
        self.gate_up = nn.Parameter(torch.empty(e, h, 2 * i))
        self.down = nn.Parameter(torch.empty(e, i, h))
        self.dispatcher: Dispatcher = LocalDispatch(e)

    def local_fn(self, x_sorted: Tensor, counts: Tensor) -> Tensor:
        """Run this rank's experts; ``counts`` has one entry per local expert."""
        return run_grouped_experts(x_sorted, counts, _local(self.gate_up), _local(self.down),
                                   self.impl)

    def forward(self, x: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
        out: Tensor = self.dispatcher(x, top_k_index, top_k_weights, self.local_fn)
        return out


class MoE(nn.Module):
    """Routed experts plus an optional always-on shared SwiGLU, on flattened tokens."""

    def __init__(self, config: MoEConfig) -> None:
        super().__init__()
        self.router = Router(config)
        self.experts = GroupedExperts(config)
        self.shared = (DenseMLP(config.hidden, config.n_shared_experts * config.moe_intermediate)
                       if config.n_shared_experts else None)

    def forward(self, x: Tensor) -> Tensor:
        flat = x.reshape(-1, x.shape[-1])
        index, weights = self.router(flat)
        y = self.experts(flat, index, weights)
        if self.shared is not None:
            y = y + self.shared(flat)
        out: Tensor = y.view(x.shape)
        return out
