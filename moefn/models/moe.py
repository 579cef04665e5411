"""The MoE feed-forward: router (softmax/sigmoid top-k, optional expert bias), fused experts.

>>> moe = MoE(get_preset("tiny"))          # doctest: +SKIP
>>> y = moe(x)  # x[B,S,H] -> [B,S,H]      # doctest: +SKIP
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from moefn.models.config import MoEConfig
from moefn.models.layers import DenseMLP
from moefn.runtime.dispatch import Dispatcher, LocalDispatch
from moefn.runtime.experts import run_grouped_experts


def _is_recomputing() -> bool:
    """True inside a backward pass, where activation checkpointing re-runs forwards."""
    return bool(torch._C._current_graph_task_id() != -1)


class Router(nn.Module):
    """Scores ``x @ weight.T``; picks top-k (by score + expert bias); counts routed slots."""

    def __init__(self, config: MoEConfig) -> None:
        super().__init__()
        self.top_k, self.score_func = config.top_k, config.score_func
        self.keep_fp32 = config.router_fp32
        self.weight = nn.Parameter(torch.empty(config.n_experts, config.hidden))
        self.expert_bias: Tensor | None
        if config.expert_bias:
            self.register_buffer("expert_bias", torch.zeros(config.n_experts))
        else:
            self.expert_bias = None
        self.tokens_per_expert: Tensor
        self.register_buffer("tokens_per_expert", torch.zeros(config.n_experts),
                             persistent=False)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        dtype = torch.float32 if self.keep_fp32 else x.dtype
        logits = x.to(dtype) @ self.weight.to(dtype).t()
        scores = logits.softmax(-1) if self.score_func == "softmax" else logits.sigmoid()
        choice = scores if self.expert_bias is None else scores + self.expert_bias
        _, index = torch.topk(choice, self.top_k, dim=-1)
        weights = scores.gather(-1, index)
        if self.score_func == "sigmoid":
            weights = weights / weights.sum(-1, keepdim=True)
        if not _is_recomputing():
            with torch.no_grad():
                self.tokens_per_expert += torch.bincount(
                    index.flatten(), minlength=self.tokens_per_expert.numel()).to(
                    self.tokens_per_expert.dtype)
        return index, weights.to(x.dtype)


class GroupedExperts(nn.Module):
    """Fused experts ``gate_up[E,H,2I]``, ``down[E,I,H]``; tokens reach them via ``dispatcher``."""

    def __init__(self, config: MoEConfig) -> None:
        super().__init__()
        e, h, i = config.n_experts, config.hidden, config.moe_intermediate
        self.impl = config.experts_impl
        self.gate_up = nn.Parameter(torch.empty(e, h, 2 * i))
        self.down = nn.Parameter(torch.empty(e, i, h))
        self.dispatcher: Dispatcher = LocalDispatch(e)

    def local_fn(self, x_sorted: Tensor, counts: Tensor) -> Tensor:
        """Run this rank's experts (the local shard when parameters are DTensors)."""
        gate_up = self.gate_up.to_local() if isinstance(self.gate_up, DTensor) else self.gate_up
        down = self.down.to_local() if isinstance(self.down, DTensor) else self.down
        return run_grouped_experts(x_sorted, counts, gate_up, down, self.impl)

    def forward(self, x: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
        out: Tensor = self.dispatcher(x, top_k_index, top_k_weights, self.local_fn)
        return out


class MoE(nn.Module):
    def __init__(self, config: MoEConfig) -> None:
        super().__init__()
        self.router = Router(config)
        self.experts = GroupedExperts(config)
        self.shared = (DenseMLP(config.hidden, config.n_shared_experts * config.moe_intermediate)
                       if config.n_shared_experts else None)

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        index, weights = self.router(flat)
        y = self.experts(flat, index, weights)
        if self.shared is not None:
            y = y + self.shared(flat)
        out: Tensor = y.view(shape)
        return out
