"""Gradient accumulation without communication: ``no_gradient_sync`` for realized models.

Run micro-batches 1..n-1 inside the context and the last one outside; each rank's loss for a
micro-batch is its token sum over the valid-token count of ALL n micro-batches together.

>>> import torch
>>> model = nn.Linear(2, 1, bias=False)
>>> with no_gradient_sync(model):  # micro-batch 1 of 2: gradients stay local
...     model(torch.ones(1, 2)).sum().backward()
>>> model(torch.ones(1, 2)).sum().backward()  # the last one reduces (realized models) as usual
>>> model.weight.grad
tensor([[2., 2.]])
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn
from torch.distributed.fsdp import FSDPModule

from moefn.plan.arguments import expect_type
from moefn.realize.sync import gradient_sync_enabled, sync_hooks_paused


@contextmanager
def no_gradient_sync(model: nn.Module) -> Iterator[None]:
    """Turn gradient reduction off for every FSDP unit of ``model`` (experts' units included)
    and for realize's all-reduce hooks; restore the previous setting at exit.

    >>> with no_gradient_sync(nn.Linear(2, 2)):
    ...     gradient_sync_enabled()
    False
    """
    expect_type(model, nn.Module, "model", "an nn.Module", "pass the realized model")
    previous = gradient_sync_enabled()
    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for unit in units:
        unit.set_requires_gradient_sync(False, recurse=False)
    try:
        with sync_hooks_paused():
            yield
    finally:
        for unit in units:
            unit.set_requires_gradient_sync(previous, recurse=False)


__all__ = ["gradient_sync_enabled", "no_gradient_sync"]
