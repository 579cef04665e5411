"""Ranks of one cp group must feed the model inputs of one batch size and one chunk length.

realize installs `check_same_inputs` as a forward pre-hook of the root module when the plan has
context-parallel attention: before the first collective of a forward, the ranks of each cp group
all-gather dims 0 and 1 (batch, sequence chunk) of every tensor argument — one all-gather of
``8 · (1 + 3 · MAX_TENSORS)`` = 200 bytes per rank, and on CUDA one host–device sync — and raise
the same `InputError` on every rank of the group when they differ, instead of failing (or
hanging) inside a K/V all-gather. Token counts across an ep group may differ and are not checked.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from moefn.analyse.comm import MAX_TENSORS
from moefn.plan.errors import InputError


def tensor_arguments(args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[tuple[str, Tensor]]:
    """The forward's tensor arguments, named: positional ones first, then keywords by name."""
    named = [*((f"argument {i}", a) for i, a in enumerate(args)), *sorted(kwargs.items())]
    return [(name, value) for name, value in named if isinstance(value, Tensor)]


def _signature(tensors: list[tuple[str, Tensor]], device: torch.device) -> Tensor:
    """[count, then (ndim, dim 0, dim 1) per tensor], padded with -1 to a fixed length."""
    row = [len(tensors)]
    for _, t in tensors[:MAX_TENSORS]:
        dims = [*t.shape[:2], -1, -1][:2]
        row += [t.dim(), *dims]
    row += [-1] * (1 + 3 * MAX_TENSORS - len(row))
    return torch.tensor(row, dtype=torch.int64, device=device)


def _shown(row: list[int], names: list[str]) -> str:
    count, parts = row[0], []
    for i in range(min(count, MAX_TENSORS)):
        ndim, *dims = row[1 + 3 * i:4 + 3 * i]
        name = names[i] if i < len(names) else f"tensor {i}"
        parts.append(f"{name} {ndim}-dim {[d for d in dims if d >= 0]}")
    return f"{count} tensors: " + ", ".join(parts)


def check_same_inputs(tensors: list[tuple[str, Tensor]], group: dist.ProcessGroup,
                      device: torch.device) -> None:
    """All-gather the signature over ``group``; raise InputError on every rank if they differ."""
    mine = _signature(tensors, device)
    gathered = torch.empty(dist.get_world_size(group) * mine.numel(), dtype=torch.int64,
                           device=device)
    dist.all_gather_single(gathered, mine, group=group)
    rows = gathered.view(-1, mine.numel()).tolist()
    if all(row == rows[0] for row in rows):
        return
    ranks = dist.get_process_group_ranks(group)
    names = [name for name, _ in tensors]
    shown = "; ".join(f"rank {r}: {_shown(row, names)}" for r, row in zip(ranks, rows, strict=True))
    raise InputError.single(
        "forward inputs", "ranks of one cp group got inputs of different batch size or sequence "
        "chunk length", shown,
        "give every rank of a cp group its chunks of the same rows (moefn.train.local_batch), "
        "with a sequence length divisible by 2·cp")


def check_positions_given(module: nn.Module, args: tuple[Any, ...],
                          kwargs: dict[str, Any]) -> None:
    """Raise InputError when ``module``'s forward takes ``position_ids`` and the call gives none
    (after `check_same_inputs`, so every rank of the group raises alike)."""
    signature = inspect.signature(module.forward)
    if "position_ids" not in signature.parameters:
        return
    try:
        given = signature.bind_partial(*args, **kwargs).arguments.get("position_ids")
    except TypeError:
        return  # arguments the forward does not take: its own call says so
    if given is None:
        raise InputError.single(
            "forward inputs", "no position_ids under context parallelism: each rank would "
            "number its sequence chunks from 0 (wrong rotary positions and causal mask)",
            "position_ids=None", "pass position_ids=, each token's index in the whole sequence "
            "(moefn.train.local_batch cuts them with the tokens)")


def install_input_check(model: nn.Module, group: dist.ProcessGroup, device_type: str) -> None:
    """Check the root forward's inputs across ``group`` (a cp group) before every forward."""

    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        tensors = tensor_arguments(args, kwargs)
        device = tensors[0][1].device if tensors else torch.device(device_type)
        check_same_inputs(tensors, group, device)
        check_positions_given(module, args, kwargs)

    model.register_forward_pre_hook(hook, with_kwargs=True, prepend=True)
