"""Local expert compute: SwiGLU experts over rows already grouped by expert.

``F.grouped_mm`` (one kernel for all experts) where device and dtype allow it, else a loop over
experts. Measured facts (torch 2.13): grouped_mm runs fp32/bf16 on CPU, only bf16 on meta and
fake tensors, needs row strides that are multiples of 16 bytes, and its backward rejects an
expanded incoming gradient (hence `_contiguous_grad`).

>>> x = torch.randn(5, 8)
>>> gate_up, down = torch.randn(2, 8, 8), torch.randn(2, 4, 8)
>>> run_grouped_experts(x, torch.tensor([3, 2]), gate_up, down).shape
torch.Size([5, 8])
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake

ExpertsImpl = Literal["auto", "grouped_mm", "loop"]


def grouped_mm_supported(x: Tensor, gate_up: Tensor) -> bool:
    """Whether ``F.grouped_mm`` runs for rows ``x[N,H]`` and weights ``gate_up[E,H,2I]``.

    bf16 on CPU, CUDA or meta (fake tensors included); fp32 on real CPU tensors only; and the
    hidden and intermediate rows must be multiples of 16 bytes.

    >>> grouped_mm_supported(torch.zeros(1, 4), torch.zeros(1, 4, 8))
    True
    """
    hidden, intermediate = gate_up.shape[1], gate_up.shape[2] // 2
    if any(d * x.element_size() % 16 for d in (hidden, intermediate)):
        return False
    if x.dtype == torch.bfloat16:
        return x.device.type in ("cpu", "cuda", "meta")
    return x.dtype == torch.float32 and x.device.type == "cpu" and not is_fake(x)


def _swiglu(h: Tensor) -> Tensor:
    gate, up = h.chunk(2, dim=-1)
    return F.silu(gate) * up


def _contiguous_grad(y: Tensor) -> Tensor:
    """Make the gradient reaching ``y`` contiguous (grouped_mm's backward needs that)."""
    if y.requires_grad:
        y.register_hook(Tensor.contiguous)  # type: ignore[no-untyped-call]  # untyped in torch
    return y


def _grouped(x: Tensor, counts: Tensor, gate_up: Tensor, down: Tensor) -> Tensor:
    offs = counts.to(x.device).cumsum(0).to(torch.int32)
    h = F.grouped_mm(x, gate_up, offs=offs)
    return _contiguous_grad(F.grouped_mm(_swiglu(h), down, offs=offs))


def _loop(x: Tensor, counts: Tensor, gate_up: Tensor, down: Tensor) -> Tensor:
    chunks = torch.split(x, counts.tolist())
    outputs = [_swiglu(chunk @ gate_up[e]) @ down[e] for e, chunk in enumerate(chunks)]
    return torch.cat(outputs) if outputs else x.new_zeros(0, down.shape[-1])


def run_grouped_experts(x_sorted: Tensor, counts: Tensor, gate_up: Tensor, down: Tensor,
                        impl: ExpertsImpl = "auto") -> Tensor:
    """``y[i] = swiglu(x[i] @ gate_up[e]) @ down[e]`` where row ``i`` belongs to expert ``e``.

    The first ``counts[0]`` rows belong to local expert 0, the next ``counts[1]`` to expert 1,
    and so on. ``"auto"`` picks grouped_mm when `grouped_mm_supported`; with no rows at all the
    loop runs (every expert still gets a zero gradient).

    >>> y = run_grouped_experts(torch.zeros(0, 4), torch.zeros(2, dtype=torch.int64),
    ...                         torch.zeros(2, 4, 8), torch.zeros(2, 4, 4), impl="grouped_mm")
    >>> y.shape
    torch.Size([0, 4])
    """
    grouped = impl == "grouped_mm" or (impl == "auto"
                                       and grouped_mm_supported(x_sorted, gate_up))
    if grouped and x_sorted.shape[0] > 0:
        return _grouped(x_sorted, counts, gate_up, down)
    return _loop(x_sorted, counts, gate_up, down)
