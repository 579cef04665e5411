"""Positions counted on the sequence an attention is given, made global under context parallelism.

A few transformers attentions count positions themselves instead of reading ``position_ids``:
Llama 4's decoder layer drops ``position_ids``, masks its chunks by the index of a token in
the sequence, and scales the queries of its NoPE layers (``use_rope`` false) by
``log1p(floor((p + 1) / floor_scale)) · attn_scale + 1`` at ``p = arange(seq) + cache length``
(temperature tuning). Under CP each rank holds two chunks of the sequence (head-tail, see
`moefn.realize.context_parallel.head_tail_indices`), so those positions must be the tokens'
indices in the whole sequence: `sequence_positions` computes them and `take_temperature_tuning`
moves the query scaling into moefn's attention, which applies it at those positions.

>>> sequence_positions(torch.zeros(1, 4, 6, 8), None).tolist()
[[0, 1, 2, 3, 4, 5]]
>>> temperature_scales((4, 0.1), torch.arange(6)[None]).flatten().tolist()[::2]
[1.0, 1.0, 1.06931471824646]
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from moefn.realize.context_parallel import head_tail_indices

TEMPERATURE = "moefn_temperature_tuning"


def sequence_positions(query: Tensor, group: dist.ProcessGroup | None) -> Tensor:
    """``[1, S]``: the index in the whole sequence of each of ``query[B, H, S, D]``'s tokens,
    laid out head-tail over the cp ``group`` (None: the local sequence is the whole one)."""
    seq = query.shape[2]
    if group is None:
        return torch.arange(seq, device=query.device)[None]
    cp = dist.get_world_size(group)
    return head_tail_indices(seq * cp, cp, dist.get_rank(group)).to(query.device)[None]


def take_temperature_tuning(module: nn.Module) -> None:
    """Turn off ``module``'s own temperature tuning (Llama 4's NoPE layers), which counts
    positions on the local sequence, and keep ``(floor_scale, attn_scale)`` for
    `tune_temperature`."""
    if getattr(module, "attn_temperature_tuning", False) and not getattr(module, "use_rope", True):
        setattr(module, TEMPERATURE, (getattr(module, "floor_scale"), getattr(module, "attn_scale")))
        setattr(module, "attn_temperature_tuning", False)


def temperature_scales(tuning: tuple[float, float], positions: Tensor) -> Tensor:
    """``[B, 1, S, 1]`` query scales at ``positions[B, S]``, as transformers computes them."""
    floor_scale, attn_scale = tuning
    scales = torch.log1p(torch.floor((positions.float() + 1.0) / floor_scale)) * attn_scale + 1.0
    return scales[:, None, :, None]


def tune_temperature(module: nn.Module, query: Tensor, positions: Tensor) -> Tensor:
    """``query[B, H, S, D]`` scaled at ``positions[B, S]`` when `take_temperature_tuning` took
    ``module``'s, else ``query``."""
    tuning: tuple[float, float] | None = getattr(module, TEMPERATURE, None)
    if tuning is None:
        return query
    return (query * temperature_scales(tuning, positions)).to(query.dtype)
