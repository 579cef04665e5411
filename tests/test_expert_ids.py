"""Expert ids carried as columns of the dispatched rows come back exactly, in every row dtype."""

from __future__ import annotations

import pytest
import torch

from moefn.realize.expert_ids import from_columns, id_columns, to_columns


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize(("top_k", "num_experts"), [(1, 8), (2, 16), (3, 256), (8, 40000)])
def test_ids_survive_the_rows(dtype: torch.dtype, top_k: int, num_experts: int) -> None:
    gen = torch.Generator().manual_seed(top_k)
    ids = torch.randint(-1, num_experts, (7, top_k), generator=gen)
    ids[0] = -1  # every slot elsewhere: all-ones bits, a NaN in any float dtype
    ids[1] = num_experts - 1
    rows = torch.randn(7, 5, dtype=dtype, generator=gen)
    cols = to_columns(ids, num_experts, dtype)
    assert cols.shape == (7, id_columns(top_k, num_experts, dtype.itemsize))
    packed = torch.cat([rows, cols], dim=1)[[6, 0, 3]]  # rows are gathered and sliced as _hop does
    assert torch.equal(from_columns(packed[:, 5:], top_k, num_experts), ids[[6, 0, 3]])
    assert torch.equal(packed[:, :5], rows[[6, 0, 3]])
