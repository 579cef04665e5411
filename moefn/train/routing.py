"""Routing statistics across ranks: load counts summed over every data-parallel rank, and the
aux-loss-free expert-bias update (DeepSeek-V3) applied identically on every rank.

>>> from moefn.adapters.reference import MoETransformer, get_preset
>>> model = MoETransformer(get_preset("tiny"))
>>> sorted(update_expert_bias(model, rate=1e-3))  # after optimizer.step(); returns the loads
['layers.0.mlp.router', 'layers.1.mlp.router']
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from moefn.adapters.reference.moe import Router
from moefn.plan.arguments import expect_type, finite_number


def global_expert_load(model: nn.Module, group: dist.ProcessGroup | None = None,
                       distributed: bool = True) -> dict[str, torch.Tensor]:
    """Tokens routed to each expert since the last reset, summed over ``group`` (default: all
    ranks — data-parallel and context-parallel ranks each route their own tokens)."""
    expect_type(model, nn.Module, "model", "an nn.Module", "pass the realized model")
    expect_type(group, (dist.ProcessGroup, type(None)), "group", "a ProcessGroup or None",
                "pass None (all ranks) or a group such as meshes.group(('dp_shard_cp',))")
    loads: dict[str, torch.Tensor] = {}
    for path, module in model.named_modules():
        if isinstance(module, Router):
            counts = module.tokens_per_expert.detach().clone()
            if distributed and dist.is_initialized() and dist.get_world_size(group) > 1:
                dist.all_reduce(counts, group=group)
            loads[path] = counts
    return loads


@torch.no_grad()
def update_expert_bias(model: nn.Module, rate: float = 1e-3,
                       group: dist.ProcessGroup | None = None,
                       distributed: bool = True) -> dict[str, torch.Tensor]:
    """Raise the bias of under-loaded experts and lower over-loaded ones by ``rate``, from the
    global load; resets the counts. Every rank applies the same update, so biases stay equal."""
    finite_number(rate, "rate")
    loads = global_expert_load(model, group, distributed)
    modules = dict(model.named_modules())
    for path, load in loads.items():
        router = modules[path]
        if isinstance(router, Router):
            if router.expert_bias is not None:
                router.expert_bias.add_(rate * torch.sign(load.mean() - load))
            router.tokens_per_expert.zero_()
    return loads
