"""Activation checkpointing of a block, with the router's ops saved (never recomputed).

Recomputing a router can pick different experts than the first forward (changed scores, ties,
nondeterministic kernels), which breaks token dispatch in backward. In ``"router"`` mode every
op that runs inside a router module is saved by selective checkpointing, so recompute reuses
the original routing; everything else is recomputed.

>>> install_checkpoint(block, mode="router", routers=[block.mlp.router])   # doctest: +SKIP
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import (
    CheckpointPolicy,
    checkpoint,
    create_selective_checkpoint_contexts,
)

_ROUTER_DEPTH = [0]
MARKER = "_moefn_checkpoint"


def in_router() -> bool:
    return _ROUTER_DEPTH[0] > 0


def is_recomputing() -> bool:
    """True while autograd runs a backward pass (where checkpointed forwards are recomputed)."""
    return bool(torch._C._current_graph_task_id() != -1)


def _enter(module: nn.Module, args: Any) -> None:
    _ROUTER_DEPTH[0] += 1


def _leave(module: nn.Module, args: Any, output: Any) -> None:
    _ROUTER_DEPTH[0] -= 1


def mark_router(router: nn.Module) -> None:
    """Track when ``router`` runs so the router policy can save its ops."""
    if not getattr(router, "_moefn_router_marked", False):
        router.register_forward_pre_hook(_enter)
        router.register_forward_hook(_leave)
        setattr(router, "_moefn_router_marked", True)


def _aten(name: str) -> Any:
    packet = getattr(torch.ops.aten, name, None)
    return None if packet is None else packet.default


def _functional(name: str) -> Any:
    packet = getattr(torch.ops._c10d_functional, name, None)
    return None if packet is None else packet.default


SELECTIVE_SAVED = frozenset(filter(None, (
    _aten("mm"), _aten("addmm"), _aten("bmm"), _aten("_grouped_mm"), _aten("topk"),
    _aten("_scaled_dot_product_flash_attention"),
    _aten("_scaled_dot_product_flash_attention_for_cpu"),
    _aten("_scaled_dot_product_efficient_attention"),
    _aten("_scaled_dot_product_cudnn_attention"),
    _functional("all_to_all_single"), _functional("all_gather_into_tensor"),
    _functional("reduce_scatter_tensor"), _functional("wait_tensor"),
)))


def _is_device_to_host(op: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    if op is not _aten("_to_copy") or not args or not isinstance(args[0], torch.Tensor):
        return False
    target = kwargs.get("device")
    return args[0].device.type != "cpu" and target is not None and torch.device(target).type == "cpu"


def router_policy(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    """Save the router's differentiable ops; its no-grad bookkeeping (load counts, which a
    recompute skips) is neither saved nor allowed to shift the saved sequence."""
    if in_router() and torch.is_grad_enabled() and not op._schema.is_mutable:
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def selective_policy(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    if op in SELECTIVE_SAVED or _is_device_to_host(op, args, kwargs):
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def _contexts(mode: str) -> Callable[[], Any] | None:
    policies = {"router": router_policy, "selective": selective_policy}
    policy = policies.get(mode)
    return None if policy is None else functools.partial(create_selective_checkpoint_contexts,
                                                         policy)


def install_checkpoint(block: nn.Module, mode: str, routers: Sequence[nn.Module] = ()) -> None:
    """Make ``block.forward`` checkpointed (non-reentrant); parameter names stay unchanged."""
    original = block.forward
    context_fn = _contexts(mode)
    for router in routers:
        mark_router(router)

    def forward(*args: Any, **kwargs: Any) -> Any:
        if context_fn is None:
            return checkpoint(original, *args, use_reentrant=False, **kwargs)
        return checkpoint(original, *args, use_reentrant=False, context_fn=context_fn, **kwargs)

    setattr(block, "forward", forward)
    setattr(block, MARKER, mode)
