"""A cheap fingerprint of a model's values, so realize can tell ranks whose weights differ.

Every rank must hold the same full tensors before realize keeps its slice of each (no data
moves when distributing), so ranks built with different seeds would otherwise train a silent
mix. One integer per tensor: the tensor's bytes read as 32-bit integers, weighted by their
position, summed modulo 2**64 on the tensor's own device (integer sums are exact and
order-free, so equal tensors give equal digests on every rank and device).

>>> a, b = torch.ones(3), torch.tensor([1.0, 1.0, 1.5])
>>> int(tensor_digest(a)) == int(tensor_digest(a.clone())), int(tensor_digest(a)) == int(tensor_digest(b))
(True, False)
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

_CHUNK = 1 << 20  # words per pass: one 8 MiB int64 buffer
_MIX = 0x9E3779B97F4A7C15 - (1 << 64)  # odd 64-bit constant (golden ratio) as a signed int64


def _words(t: Tensor) -> Tensor:
    """The tensor's bytes as a flat int32 tensor (zero-padded to a multiple of 4 bytes)."""
    flat = t.detach().contiguous().reshape(-1)
    if flat.is_complex():
        flat = torch.view_as_real(flat).reshape(-1)
    raw = flat.view(torch.uint8)
    if raw.numel() % 4:
        raw = torch.cat((raw, raw.new_zeros(4 - raw.numel() % 4)))
    return raw.view(torch.int32)


def _signed64(n: int) -> int:
    return (n + (1 << 63)) % (1 << 64) - (1 << 63)


def tensor_digest(t: Tensor) -> Tensor:
    """A 0-dim int64 tensor on ``t``'s device: Σ_c (c·MIX + 1) Σ_i word_ci · (i·MIX + 1) over
    chunks c, wrapping at 2**64 (integer arithmetic: exact and independent of the order)."""
    words = _words(t)
    size = min(words.numel(), _CHUNK)
    weights = torch.arange(size, dtype=torch.int64, device=t.device) * _MIX + 1
    buffer = torch.empty(size, dtype=torch.int64, device=t.device)
    total = torch.zeros((), dtype=torch.int64, device=t.device)
    for c, start in enumerate(range(0, words.numel(), _CHUNK)):
        chunk = words[start:start + _CHUNK]
        part = buffer[:chunk.numel()]
        part.copy_(chunk)
        total += part.mul_(weights[:chunk.numel()]).sum() * _signed64(c * _MIX + 1)
    return total


def value_digests(model: nn.Module) -> tuple[tuple[str, int | None], ...]:
    """(name, digest) of every parameter and buffer in ``named_parameters``/``named_buffers``
    order; None for a meta tensor (it has no values). One host sync per device."""
    tensors = [*model.named_parameters(), *model.named_buffers()]
    real = [(name, t) for name, t in tensors if t.device.type != "meta"]
    by_device: dict[torch.device, list[tuple[str, Tensor]]] = {}
    for name, t in real:
        by_device.setdefault(t.device, []).append((name, tensor_digest(t)))
    digests: dict[str, int] = {}
    for pairs in by_device.values():
        values = torch.stack([d for _, d in pairs]).tolist()
        digests.update((name, int(v)) for (name, _), v in zip(pairs, values, strict=True))
    return tuple((name, digests.get(name)) for name, _ in tensors)
