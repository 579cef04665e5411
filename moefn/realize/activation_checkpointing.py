"""Activation checkpointing of a block, with routing that recompute cannot change.

Recomputing a router can pick different experts than the first forward did (changed scores,
ties, nondeterministic kernels), which breaks token dispatch in backward. ``"router"`` mode
gives each checkpoint call its own routing tape (`moefn.realize.routing_tape`): routers record
their top-k choice in forward and replay it during recompute (the scores — and so the routing
weights' gradients — are recomputed); everything else is recomputed. ``"selective"`` mode saves
matmuls, attention, collectives and top-k through torch's selective checkpointing and
recomputes the rest; ``"full"`` recomputes all.

>>> from moefn.adapters.reference import MoETransformer, get_preset
>>> block = MoETransformer(get_preset("tiny")).layers[0]
>>> install_checkpoint(block, mode="router")
>>> getattr(block, MARKER)
'router'
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import (
    SAC_IGNORED_OPS,
    CheckpointPolicy,
    checkpoint,
    create_selective_checkpoint_contexts,
)

from moefn.realize.routing_tape import tape_contexts

MARKER = "_moefn_checkpoint"


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


def selective_policy(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    if op in SELECTIVE_SAVED or _is_device_to_host(op, args, kwargs):
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


# Profiler annotations are not tensor computation, yet torch's selective checkpointing counts
# them: FSDP units nested in a checkpointed block (e.g. fp32 routers under bf16) annotate a
# different number of times in recompute than in forward, and the replay fails with "invocation
# index ... not found in storage" (pytorch/torchtitan#3427). They must not be counted.
_PROFILER_OPS = (torch.ops.profiler._record_function_enter_new.default,
                 torch.ops.profiler._record_function_exit._RecordFunction)


def _selective_contexts() -> Any:
    SAC_IGNORED_OPS.update(_PROFILER_OPS)
    return create_selective_checkpoint_contexts(selective_policy)  # type: ignore[no-untyped-call]


_CONTEXTS: dict[str, Callable[[], Any]] = {"router": tape_contexts,
                                          "selective": _selective_contexts}


def install_checkpoint(block: nn.Module, mode: str) -> None:
    """Make ``block.forward`` checkpointed (non-reentrant); parameter names stay unchanged."""
    original = block.forward
    context_fn = _CONTEXTS.get(mode)

    def forward(*args: Any, **kwargs: Any) -> Any:
        if context_fn is None:
            return checkpoint(original, *args, use_reentrant=False, **kwargs)
        return checkpoint(original, *args, use_reentrant=False, context_fn=context_fn, **kwargs)

    block.forward = forward
    setattr(block, MARKER, mode)
