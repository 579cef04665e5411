"""Local expert compute: SwiGLU experts over tokens grouped by expert.

``torch._grouped_mm`` where the device and dtype support it (CPU: fp32 and bf16; meta/fake
tensors: bf16 only), a loop over experts otherwise.

>>> y = run_grouped_experts(x_sorted, counts, gate_up, down)     # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous (grouped_mm needs it)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        return grad.contiguous()


def grouped_mm_supported(x: Tensor, gate_up: Tensor) -> bool:
    """Device/dtype allow grouped_mm and every row stride is a multiple of 16 bytes."""
    aligned = all(d * x.element_size() % 16 == 0 for d in (*gate_up.shape[1:], gate_up.shape[2] // 2))
    if x.device.type == "meta":
        return aligned and x.dtype == torch.bfloat16
    return aligned and x.device.type in ("cpu", "cuda") and x.dtype in (torch.float32,
                                                                        torch.bfloat16)


def _swiglu(h: Tensor) -> Tensor:
    gate, up = h.chunk(2, dim=-1)
    return F.silu(gate) * up


def _grouped(x: Tensor, counts: Tensor, gate_up: Tensor, down: Tensor) -> Tensor:
    offs = counts.to(device=x.device).cumsum(0).to(torch.int32)
    h = torch._grouped_mm(x, gate_up, offs=offs)
    y = torch._grouped_mm(_swiglu(h), down, offs=offs)
    out: Tensor = _ContiguousGrad.apply(y)  # type: ignore[no-untyped-call]
    return out


def _loop(x: Tensor, counts: Tensor, gate_up: Tensor, down: Tensor) -> Tensor:
    outputs = []
    for e, chunk in enumerate(torch.split(x, counts.tolist())):
        outputs.append(_swiglu(chunk @ gate_up[e]) @ down[e])
    if not outputs:
        return x.new_zeros(0, down.shape[-1])
    return torch.cat(outputs)


def run_grouped_experts(x_sorted: Tensor, counts: Tensor, gate_up: Tensor, down: Tensor,
                        impl: str = "auto") -> Tensor:
    """``y[i] = swiglu(x[i] @ gate_up[e]) @ down[e]`` for the expert ``e`` that row ``i`` belongs to.

    ``counts[e]`` rows belong to local expert ``e`` (rows sorted by expert). Experts with zero
    rows still get (zero) gradients.
    """
    use_grouped = impl == "grouped_mm" or (impl == "auto" and grouped_mm_supported(x_sorted, gate_up))
    if use_grouped and x_sorted.shape[0] > 0:
        return _grouped(x_sorted, counts, gate_up, down)
    y = _loop(x_sorted, counts, gate_up, down)
    # keep every expert parameter in the graph even with zero rows
    return y + 0.0 * (gate_up.sum() + down.sum()) if x_sorted.shape[0] == 0 else y
