"""The routing tape: router top-k choices recorded in forward and replayed in recompute.

The one API for a model's routers under router-mode activation checkpointing (`plan_ac`'s
``"router"``). Each checkpointed call gets its own tape (`tape_contexts`, the checkpoint's
``context_fn``): in forward every routing choice is appended to it, in recompute the same
choices come back in call order, so recompute cannot route differently. A router takes part
in one of two ways:

- it calls `route` (or `taped`) for its top-k indices (the reference model's `Router`);
- it calls ``torch.topk`` itself and its model kind's adapter hooks it with `replay_topk`
  (`moefn.adapters.adapter.Adapter.install_router_replay`).

Outside a router-mode checkpoint both just compute.

>>> import torch
>>> record, replay = tape_contexts()
>>> with record:
...     first = route(torch.tensor([[0.1, 0.9, 0.5]]), top_k=1)
>>> with replay:
...     again = route(torch.tensor([[0.9, 0.1, 0.5]]), top_k=1)  # scores changed: choice kept
>>> first.tolist(), again.tolist()
([[1]], [[1]])
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

REPLAYING = "_moefn_router_replay"  # set on a module `replay_topk` hooked


def is_recomputing() -> bool:
    """True while autograd runs a backward pass (where checkpointed forwards are recomputed)."""
    return bool(torch._C._current_graph_task_id() != -1)


class RoutingTape:
    """Top-k choices of the routers inside one checkpointed call, in call order."""

    def __init__(self) -> None:
        self.entries: list[Tensor] = []
        self.replay_position = 0


_ACTIVE: list[tuple[str, RoutingTape]] = []  # the innermost active (mode, tape)


@contextlib.contextmanager
def _using(mode: str, tape: RoutingTape) -> Iterator[None]:
    _ACTIVE.append((mode, tape))
    tape.replay_position = 0
    try:
        yield
    finally:
        _ACTIVE.pop()


def tape_contexts() -> tuple[contextlib.AbstractContextManager[None],
                             contextlib.AbstractContextManager[None]]:
    """(record, replay) contexts over one new tape: a checkpoint's ``context_fn``."""
    tape = RoutingTape()
    return _using("record", tape), _using("replay", tape)


def taping() -> bool:
    """True inside a router-mode checkpoint (a routing tape records or replays)."""
    return bool(_ACTIVE)


def taped(choose: Callable[[], Tensor], what: str = "routers") -> Tensor:
    """``choose()`` (top-k indices), recorded on the innermost routing tape in forward and
    replayed from it in recompute; outside a router-mode checkpoint just ``choose()``."""
    if _ACTIVE and _ACTIVE[-1][0] == "replay":
        tape = _ACTIVE[-1][1]
        if tape.replay_position >= len(tape.entries):
            raise RuntimeError(f"recompute ran more {what} than the forward it replays")
        index = tape.entries[tape.replay_position]
        tape.replay_position += 1
        return index
    index = choose().detach()  # no autograd state: replayable
    if _ACTIVE and _ACTIVE[-1][0] == "record":
        _ACTIVE[-1][1].entries.append(index)
    return index


def route(choice: Tensor, top_k: int) -> Tensor:
    """``topk(choice).indices``, recorded in forward and replayed in recompute under "router"."""
    return taped(lambda: torch.topk(choice.detach(), top_k, dim=-1).indices)


class _GatherAt(torch.autograd.Function):
    """``source.gather(dim, index)`` that saves only ``index`` for backward, as ``topk`` does, so
    the recorded forward and the replayed recompute save the same tensors (checkpoint checks)."""

    @staticmethod
    def forward(ctx: Any, source: Tensor, dim: int, index: Tensor) -> Tensor:
        ctx.dim, ctx.shape = dim, source.shape
        ctx.save_for_backward(index)
        return source.gather(dim, index)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        (index,) = ctx.saved_tensors
        return grad.new_zeros(ctx.shape).scatter(ctx.dim, index, grad), None, None


class _TopKTape(TorchFunctionMode):
    """Inside a router-mode checkpoint, every ``topk`` is recorded on the active routing tape in
    forward and replayed in recompute; its values are gathered at the indices either way."""

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func not in (torch.topk, Tensor.topk) or not taping():
            return func(*args, **kwargs)

        def choose() -> Tensor:
            with torch.no_grad():
                return func(*args, **kwargs)[1]  # type: ignore[no-any-return]

        index = taped(choose, "router top-k calls")
        dim = kwargs.get("dim", args[2] if len(args) > 2 else -1)
        values = _GatherAt.apply(args[0], dim, index)  # type: ignore[no-untyped-call]
        return torch.return_types.topk((values, index))


def replay_topk(router: nn.Module) -> None:
    """Hook ``router`` (a module that calls ``torch.topk`` itself) so that inside a router-mode
    checkpoint each of its ``topk`` calls is taped: the indices recorded in forward and replayed
    in recompute, the values gathered from the recomputed scores at them (gradients flow as
    through ``topk``). Hooking twice is a no-op."""
    if getattr(router, REPLAYING, False):
        return
    active: list[_TopKTape] = []

    def enter(module: nn.Module, args: Any) -> None:
        if taping():
            mode = _TopKTape()
            mode.__enter__()  # type: ignore[no-untyped-call]  # untyped in torch
            active.append(mode)

    def leave(module: nn.Module, args: Any, output: Any) -> None:
        if active:
            active.pop().__exit__(None, None, None)  # type: ignore[no-untyped-call]

    router.register_forward_pre_hook(enter)
    router.register_forward_hook(leave, always_call=True)
    setattr(router, REPLAYING, True)
