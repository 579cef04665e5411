"""Expert ids as extra columns of the dispatched rows, so they share the rows' all-to-all.

Ids in ``[-1, num_experts)`` are stored as int16 (int32 past 32767 experts), their bytes
reinterpreted in the rows' dtype and padded to whole columns: ``K = 2`` ids take one fp32 column
or two bf16 ones. The columns are bit patterns, not numbers (``-1`` pairs read as NaN); only
copies touch them between `to_columns` and `from_columns`.

>>> ids = torch.tensor([[3, -1], [0, 7]])
>>> cols = to_columns(ids, 8, torch.float32)
>>> cols.shape, torch.equal(from_columns(cols, 2, 8), ids)
(torch.Size([2, 1]), True)
"""

from __future__ import annotations

import torch
from torch import Tensor


def _id_dtype(num_experts: int) -> torch.dtype:
    return torch.int16 if num_experts <= torch.iinfo(torch.int16).max else torch.int32


def id_columns(top_k: int, num_experts: int, itemsize: int) -> int:
    """Columns of ``itemsize`` bytes that carry ``top_k`` ids (`to_columns`' width)."""
    return -(-top_k * _id_dtype(num_experts).itemsize // itemsize)


def to_columns(ids: Tensor, num_experts: int, dtype: torch.dtype) -> Tensor:
    """``ids [P, K]`` as ``[P, id_columns(K, num_experts, dtype.itemsize)]`` of ``dtype``."""
    raw = ids.to(_id_dtype(num_experts)).view(torch.uint8)
    width = id_columns(ids.shape[1], num_experts, dtype.itemsize) * dtype.itemsize
    return torch.nn.functional.pad(raw, (0, width - raw.shape[1])).view(dtype)


def from_columns(columns: Tensor, top_k: int, num_experts: int) -> Tensor:
    """The int64 ids ``[P, top_k]`` that `to_columns` stored in ``columns``."""
    id_dtype = _id_dtype(num_experts)
    raw = columns.detach().contiguous().view(torch.uint8)[:, : top_k * id_dtype.itemsize]
    return raw.contiguous().view(id_dtype).to(torch.int64)
