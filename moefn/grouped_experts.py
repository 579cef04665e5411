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

from collections.abc import Callable
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


def swiglu(h: Tensor) -> Tensor:
    """``silu(gate) * up`` of ``h = [gate, up]`` (last dim)."""
    gate, up = h.chunk(2, dim=-1)
    return F.silu(gate) * up


def _contiguous_grad(y: Tensor) -> Tensor:
    """Make the gradient reaching ``y`` contiguous (grouped_mm's backward needs that)."""
    if y.requires_grad:
        y.register_hook(Tensor.contiguous)  # type: ignore[no-untyped-call]  # untyped in torch
    return y


Activation = Callable[[Tensor], Tensor]


def _grouped(x: Tensor, counts: Tensor, gate_up: Tensor, down: Tensor, activate: Activation,
             up_bias: Tensor | None, down_bias: Tensor | None) -> Tensor:
    offs = counts.to(x.device).cumsum(0).to(torch.int32)
    h = F.grouped_mm(x, gate_up, offs=offs)
    rows = None
    if up_bias is not None or down_bias is not None:  # the local expert of every row
        rows = torch.repeat_interleave(torch.arange(counts.numel(), device=x.device),
                                       counts.to(x.device), output_size=x.shape[0])
    if up_bias is not None and rows is not None:
        h = h + up_bias[rows]
    y = _contiguous_grad(F.grouped_mm(activate(h), down, offs=offs))
    return y + down_bias[rows] if down_bias is not None and rows is not None else y


def _loop(x: Tensor, counts: Tensor, gate_up: Tensor, down: Tensor, activate: Activation,
          up_bias: Tensor | None, down_bias: Tensor | None) -> Tensor:
    outputs = []
    for e, chunk in enumerate(torch.split(x, counts.tolist())):
        h = chunk @ gate_up[e]
        if up_bias is not None:
            h = h + up_bias[e]
        out = activate(h) @ down[e]
        outputs.append(out + down_bias[e] if down_bias is not None else out)
    return torch.cat(outputs) if outputs else x.new_zeros(0, down.shape[-1])


def run_grouped_experts(x_sorted: Tensor, counts: Tensor, gate_up: Tensor, down: Tensor,
                        impl: ExpertsImpl = "auto", activate: Activation = swiglu,
                        up_bias: Tensor | None = None,
                        down_bias: Tensor | None = None) -> Tensor:
    """``y[i] = activate(x[i] @ gate_up[e] + up_bias[e]) @ down[e] + down_bias[e]`` where row
    ``i`` belongs to expert ``e`` (SwiGLU and no biases by default).

    The first ``counts[0]`` rows belong to local expert 0, the next ``counts[1]`` to expert 1,
    and so on. ``"auto"`` picks grouped_mm when `grouped_mm_supported`; with no rows at all the
    loop runs (every expert still gets a zero gradient).

    >>> y = run_grouped_experts(torch.zeros(0, 4), torch.zeros(2, dtype=torch.int64),
    ...                         torch.zeros(2, 4, 8), torch.zeros(2, 4, 4), impl="grouped_mm")
    >>> y.shape
    torch.Size([0, 4])
    """
    # weights FSDP did not cast (experts without a unit when ep_shard = 1) follow the rows'
    # dtype, as mixed precision would; gradients flow back to them in their own dtype
    gate_up, down = gate_up.to(x_sorted.dtype), down.to(x_sorted.dtype)
    up_bias = None if up_bias is None else up_bias.to(x_sorted.dtype)
    down_bias = None if down_bias is None else down_bias.to(x_sorted.dtype)
    grouped = impl == "grouped_mm" or (impl == "auto"
                                       and grouped_mm_supported(x_sorted, gate_up))
    run = _grouped if grouped and x_sorted.shape[0] > 0 else _loop
    return run(x_sorted, counts, gate_up, down, activate, up_bias, down_bias)
