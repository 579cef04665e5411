"""Tensor parallelism for transformers attention: the adapter's ``install_tensor_parallel``.

Between modules the residual stream is each tp rank's chunk of the sequence
(`moefn.realize.tensor_parallel`). transformers builds its mask and rotary positions in the
backbone, before the layers, from what the embedding returned — a chunk — so the attention
switches to moefn's attention implementation, which masks by the ``position_ids`` the model was
called with (the whole local sequence), and the gathered ``hidden_states`` must match them.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh

from moefn.adapters.transformers.attention import IMPLEMENTATION, register
from moefn.realize.tensor_parallel import gather_sequence

TP_HIDDEN = "hidden_states"
_MESH = "_moefn_tp_gather_mesh"


def _gather_hidden(module: nn.Module, args: tuple[Any, ...],
                   kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Gather ``hidden_states`` (keyword, as decoder layers pass it, or first positional)."""
    mesh: DeviceMesh = getattr(module, _MESH)
    if TP_HIDDEN in kwargs:
        kwargs = {**kwargs, TP_HIDDEN: gather_sequence(kwargs[TP_HIDDEN], mesh)}
        whole: Tensor = kwargs[TP_HIDDEN]
    else:
        whole = gather_sequence(args[0], mesh)
        args = (whole, *args[1:])
    positions = kwargs.get("position_ids")
    if isinstance(positions, Tensor) and positions.shape[-1] != whole.shape[1]:
        raise ValueError(f"{type(module).__name__}: position_ids cover {positions.shape[-1]} "
                         f"tokens, the tp group's sequence {whole.shape[1]}; call the model "
                         "with position_ids=... for the whole local sequence (tp>1)")
    return args, kwargs


def install_tensor_parallel(module: nn.Module, mesh: DeviceMesh) -> None:
    """Gather ``module``'s input sequence over ``mesh``; attention then masks by the model's
    ``position_ids`` (the model's config switches to moefn's attention implementation)."""
    setattr(module, _MESH, mesh)
    module.register_forward_pre_hook(_gather_hidden, with_kwargs=True)
    config = getattr(module, "config", None)
    if config is not None:
        register()
        config._attn_implementation_internal = IMPLEMENTATION
