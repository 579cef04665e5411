"""Checkpoints of models and optimizers through ``torch.distributed.checkpoint`` (DCP).

Keys are the unparallelized model's keys (realize adds no wrapper prefixes), and DCP reshards
on load, so a checkpoint saved under one layout loads under any other, or into a plain model.
A model that holds DTensors (realized with FSDP or EP) is saved and loaded by every rank of the
default process group together; a model without DTensors is a one-process model (``no_dist``):
any single process may save or load it, with or without a process group.

>>> import tempfile
>>> path = tempfile.mkdtemp() + "/step-100"
>>> model, other = nn.Linear(2, 2), nn.Linear(2, 2)
>>> save_checkpoint(path, model, None)
>>> load_checkpoint(path, other, None)  # or a model realized in another layout
>>> torch.equal(full_state_dict(other)["weight"], model.weight)  # full tensors, every rank
True
>>> with torch.device("meta"):
...     empty = nn.Linear(2, 2)
>>> torch.equal(materialize_from_checkpoint(path, empty, "cpu").weight, model.weight)
True
"""

from __future__ import annotations

import itertools
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)
from torch.distributed.checkpoint.state_dict_loader import load
from torch.distributed.checkpoint.state_dict_saver import save
from torch.distributed.tensor import DTensor

from moefn.plan.arguments import device_arg, expect_type, shown
from moefn.plan.errors import PlanError
from moefn.plan.hf_roles import is_transformers_module

Path = str | os.PathLike[str]


def _single_process(model: nn.Module) -> bool:
    """True when ``model`` holds no DTensor, so no other rank takes part (DCP ``no_dist``)."""
    tensors = itertools.chain(model.parameters(), model.buffers())
    return not any(isinstance(t, DTensor) for t in tensors)


@contextmanager
def _quiet_no_dist() -> Iterator[None]:
    """DCP warns on every ``no_dist`` call, even an explicit one: ours is intended."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable")
        yield


def _state(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
    """``{"model": ..., "optim": ...}`` in DCP's sharded form (this rank's shards only)."""
    if optimizer is None:
        return {"model": get_model_state_dict(model)}
    model_state, optim_state = get_state_dict(model, optimizer)
    return {"model": model_state, "optim": optim_state}


def _check(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None,
           must_exist: bool) -> None:
    """Raise moefn's typed errors for arguments the DCP calls would choke on."""
    expect_type(path, (str, os.PathLike), "path", "a str or os.PathLike",
                'pass a directory such as "ckpt/step-100"')
    expect_type(model, nn.Module, "model", "an nn.Module", "pass the model")
    expect_type(optimizer, (torch.optim.Optimizer, type(None)), "optimizer",
                "a torch.optim.Optimizer or None", "pass the optimizer, or None for the model only")
    if must_exist and not os.path.isdir(path):
        raise PlanError.single("path", "no checkpoint directory", shown(os.fspath(path)),
                               "pass the directory save_checkpoint wrote")


def save_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
    """Write ``model`` (and ``optimizer``) state to the directory ``path``; each rank writes its
    shards, replicated shards once."""
    _check(path, model, optimizer, must_exist=False)
    with _quiet_no_dist():
        save(_state(model, optimizer), checkpoint_id=path, no_dist=_single_process(model))


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
    """Load ``model`` (and ``optimizer``) in place from ``path``, saved under any layout; each rank
    reads only the pieces of its own shards."""
    _check(path, model, optimizer, must_exist=True)
    state = _state(model, optimizer)
    with _quiet_no_dist():
        load(state, checkpoint_id=path, no_dist=_single_process(model))
    if optimizer is None:
        set_model_state_dict(model, state["model"])
    else:
        set_state_dict(model, optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optim"])


def full_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """A snapshot of the unparallelized state dict: plain full tensors (copies) on every rank.

    Collective when ``model`` holds DTensors: every rank must call it.

    >>> full_state_dict(nn.Linear(2, 1, bias=False))["weight"].shape
    torch.Size([1, 2])
    """
    expect_type(model, nn.Module, "model", "an nn.Module", "pass the model")
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    full: dict[str, Tensor] = {}
    for key, value in state.items():
        assert isinstance(value, Tensor) and not isinstance(value, DTensor), key
        full[key] = value.detach().clone()
    return full


def materialize_from_checkpoint(path: Path, model: nn.Module,
                                device: torch.device | str) -> nn.Module:
    """Allocate a meta-device model (realized or plain) on ``device`` and fill it from ``path``.

    Each rank allocates and reads only its own shards, so no rank ever holds the full model.
    ``to_empty`` leaves every tensor uninitialised: the checkpoint fills parameters and
    persistent buffers; non-persistent ones are restored (`restore_non_persistent_buffers`).
    """
    device = device_arg(device)
    _check(path, model, None, must_exist=True)
    model.to_empty(device=device)
    restore_non_persistent_buffers(model, device)
    load_checkpoint(path, model, None)
    return model


def restore_non_persistent_buffers(model: nn.Module, device: torch.device) -> None:
    """Non-persistent buffers are in no checkpoint, so ``to_empty`` leaves them garbage: rebuild
    transformers modules that own some (rotary ``inv_freq``) from their config on ``device``,
    zero the others (e.g. routers' token counters).

    >>> restore_non_persistent_buffers(nn.Linear(2, 2), torch.device("cpu"))
    """
    for module in model.modules():
        names = [n for n in module._non_persistent_buffers_set if module._buffers.get(n) is not None]
        if not names:
            continue
        config = getattr(module, "config", None)
        fresh: nn.Module | None = None
        if is_transformers_module(module) and config is not None:
            with torch.device(device):
                fresh = type(module)(config)
        with torch.no_grad():
            for name in names:
                buffer = module._buffers[name]
                assert buffer is not None
                if fresh is None:
                    buffer.zero_()
                else:
                    buffer.copy_(fresh.get_buffer(name))
