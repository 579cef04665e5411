"""Ring (p2p) context parallelism: K/V blocks travel the cp ring, so no rank holds all of them.

Each cp rank keeps its own (head-tail) queries, keys and values. In ``cp`` steps every rank
attends its queries to the K/V block it holds while handing that block to the next rank and
receiving the previous rank's (``dist.batch_isend_irecv``: any backend, gloo and NCCL alike);
partial results merge with the log-sum-exp rule (`merge_partials`). Only the real KV heads
travel (grouped query heads share them inside a block, never expanded). Each rank's sequence is
attended in two halves (the head and tail chunks); a (query half, key half) pair that the causal
mask hides entirely is skipped, which under the head-tail layout is half of every remote block.

The backward is a ring too (`RingAttention`): K/V blocks travel again while each block's
dK/dV accumulator travels with it, gathering every rank's contribution, and arrives back at its
owner after the last step. Block math is explicit fp32 (scores, masks from global positions,
log-sum-exp), so it runs on every device; a rank only ever holds its own K/V, one incoming
block and one ``[S/cp/2]²`` score tile per head.

>>> q, kv = torch.randn(1, 4, 6, 8), torch.randn(1, 2, 6, 8)
>>> pos = torch.arange(6)[None]
>>> ring = ring_attention(q, kv, kv, pos, causal=True, group=None)
>>> from moefn.adapters.reference.layers import local_attention
>>> torch.allclose(ring, local_attention(q, kv, kv, pos, causal=True), atol=1e-6)
True
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import Tensor

_KV_TAG, _GRAD_TAG = 0, 1  # K/V blocks and dK/dV accumulators are separate message streams


def merge_partials(out: Tensor, lse: Tensor, block_out: Tensor,
                   block_lse: Tensor) -> tuple[Tensor, Tensor]:
    """Merge two normalised attention partials by their log-sum-exps (``-inf``: no keys seen).

    >>> s = torch.randn(3, 5)
    >>> v = torch.randn(5, 2)
    >>> a = (s[:, :2].softmax(-1) @ v[:2], s[:, :2].logsumexp(-1))
    >>> b = (s[:, 2:].softmax(-1) @ v[2:], s[:, 2:].logsumexp(-1))
    >>> out, lse = merge_partials(*a, *b)
    >>> torch.allclose(out, s.softmax(-1) @ v, atol=1e-6), torch.allclose(lse, s.logsumexp(-1))
    (True, True)
    """
    merged = torch.logaddexp(lse, block_lse)
    safe = _finite(merged)
    weight, block_weight = (lse - safe).exp(), (block_lse - safe).exp()
    return out * weight[..., None] + block_out * block_weight[..., None], merged


def _finite(lse: Tensor) -> Tensor:
    """``lse`` with ``-inf`` rows (every key masked) set to 0, so ``exp(x − lse)`` stays 0."""
    return torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)


def _block_forward(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None,
                   scale: float) -> tuple[Tensor, Tensor]:
    """``q[B,Hkv,g,Sq,D]`` (fp32) against ``k[B,Hkv,Sk,D]``, ``v``: normalised output and lse."""
    scores = q @ k.float().unsqueeze(2).transpose(-1, -2) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    lse = scores.logsumexp(-1)
    probs = (scores - _finite(lse)[..., None]).exp()
    return probs @ v.float().unsqueeze(2), lse


def _block_backward(q: Tensor, k: Tensor, v: Tensor, dout: Tensor, lse: Tensor, delta: Tensor,
                    mask: Tensor | None, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """dQ, dK, dV (fp32) of one block given the merged ``lse`` and ``delta = Σ dO·O``."""
    kf, vf = k.float().unsqueeze(2), v.float().unsqueeze(2)
    scores = q @ kf.transpose(-1, -2) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = (scores - _finite(lse)[..., None]).exp()
    dscores = probs * (dout @ vf.transpose(-1, -2) - delta[..., None]) * scale
    dq = dscores @ kf
    dk = (dscores.transpose(-1, -2) @ q).sum(2)
    dv = (probs.transpose(-1, -2) @ dout).sum(2)
    return dq, dk, dv


class _Ring:
    """This rank's neighbours on the cp ring and one p2p exchange with them."""

    def __init__(self, group: dist.ProcessGroup) -> None:
        self.group, self.size, self.rank = group, group.size(), group.rank()
        self.next = dist.get_global_rank(group, (self.rank + 1) % self.size)
        self.prev = dist.get_global_rank(group, (self.rank - 1) % self.size)

    def exchange(self, send: Tensor, tag: int) -> tuple[Tensor, list[Any]]:
        """Send ``send`` to the next rank, receive the previous rank's into a new buffer."""
        recv = torch.empty_like(send)
        works = dist.batch_isend_irecv([dist.P2POp(dist.isend, send, self.next, self.group, tag),
                                        dist.P2POp(dist.irecv, recv, self.prev, self.group, tag)])
        return recv, works


def _wait(works: list[Any]) -> None:
    for work in works:
        work.wait()


def _pack(*tensors: Tensor) -> Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def _unpack(flat: Tensor, shapes: tuple[torch.Size, ...]) -> list[Tensor]:
    parts = torch.split(flat, [shape.numel() for shape in shapes])
    return [part.view(shape) for part, shape in zip(parts, shapes, strict=True)]


class _Blocks:
    """Which (query half, key half) tiles of a step are computed, and their causal masks.

    ``positions[B, cp·S]`` are every rank's global positions in rank order; one host sync reads
    each half's smallest and largest position (a tile is skipped when its largest query
    position is below its smallest key position, and needs no mask when its smallest query
    position is at or above the largest key position)."""

    def __init__(self, positions: Tensor | None, cp: int, me: int, seq: int) -> None:
        if seq % 2:
            raise ValueError(f"ring attention needs an even local sequence length, got {seq}")
        self.positions, self.cp, self.me, self.half = positions, cp, me, seq // 2
        self.bounds: list[list[tuple[int, int]]] = []
        if positions is not None:
            chunks = self._chunks()
            lows, highs = chunks.amin(dim=(0, 3)).tolist(), chunks.amax(dim=(0, 3)).tolist()
            self.bounds = [list(zip(lo, hi, strict=True)) for lo, hi in zip(lows, highs,
                                                                            strict=True)]

    def tiles(self, src: int) -> list[tuple[int, int, Tensor | None]]:
        """``(query half, key half, mask or None)`` for the block that rank ``src`` owns."""
        out: list[tuple[int, int, Tensor | None]] = []
        for hq in (0, 1):
            for hk in (0, 1):
                if self.positions is None:
                    out.append((hq, hk, None))
                    continue
                (q_lo, q_hi), (k_lo, k_hi) = self.bounds[self.me][hq], self.bounds[src][hk]
                if q_hi < k_lo:
                    continue
                out.append((hq, hk, None if q_lo >= k_hi else self._mask(src, hq, hk)))
        return out

    def _chunks(self) -> Tensor:
        """Positions as ``[B, cp, 2, S/2]``: each rank's two halves."""
        assert self.positions is not None
        return self.positions.reshape(self.positions.shape[0], self.cp, 2, self.half)

    def _mask(self, src: int, hq: int, hk: int) -> Tensor:
        chunks = self._chunks()
        q_pos, k_pos = chunks[:, self.me, hq], chunks[:, src, hk]
        return q_pos[:, None, None, :, None] >= k_pos[:, None, None, None, :]


def _grouped(t: Tensor, kv_heads: int) -> Tensor:
    """``[B, Hq, S, D]`` → ``[B, Hkv, g, S, D]`` (query head h uses KV head h // g)."""
    return t.reshape(t.shape[0], kv_heads, -1, *t.shape[2:])


def _halves(t: Tensor, dim: int) -> tuple[Tensor, Tensor]:
    first, second = t.chunk(2, dim=dim)
    return first, second


class RingAttention(torch.autograd.Function):
    """Forward and backward rings; ``group=None`` attends locally with the same block math."""

    @staticmethod
    def forward(ctx: Any, q: Tensor, k: Tensor, v: Tensor, positions: Tensor | None,
                group: dist.ProcessGroup | None, scale: float) -> Tensor:
        ring = None if group is None else _Ring(group)
        cp, me = (1, 0) if ring is None else (ring.size, ring.rank)
        blocks = _Blocks(positions, cp, me, q.shape[2])
        qf = _grouped(q.float(), k.shape[1])
        q_halves = _halves(qf, 3)
        outs = [h.new_zeros((*h.shape[:-1], v.shape[-1])) for h in q_halves]
        lses = [h.new_full(h.shape[:-1], float("-inf")) for h in q_halves]
        block = _pack(k, v)
        for step in range(cp):
            recv: tuple[Tensor, list[Any]] | None = None
            if ring is not None and step < cp - 1:
                recv = ring.exchange(block, _KV_TAG)
            k_s, v_s = _unpack(block, (k.shape, v.shape))
            k_h, v_h = _halves(k_s, 2), _halves(v_s, 2)
            for hq, hk, mask in blocks.tiles((me - step) % cp):
                part = _block_forward(q_halves[hq], k_h[hk], v_h[hk], mask, scale)
                outs[hq], lses[hq] = merge_partials(outs[hq], lses[hq], *part)
            if recv is not None:
                _wait(recv[1])
                block = recv[0]
        out = torch.cat(outs, dim=3)
        ctx.save_for_backward(q, k, v, out, torch.cat(lses, dim=3))
        ctx.blocks, ctx.ring, ctx.scale = blocks, ring, scale
        return out.flatten(1, 2).to(q.dtype)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        q, k, v, out, lse = ctx.saved_tensors
        blocks, ring, scale = ctx.blocks, ctx.ring, ctx.scale
        cp, me = (1, 0) if ring is None else (ring.size, ring.rank)
        qf = _grouped(q.float(), k.shape[1])
        dout = _grouped(grad.float(), k.shape[1])
        delta = (dout * out).sum(-1)
        q_h, dout_h, lse_h, delta_h = (_halves(t, 3) for t in (qf, dout, lse, delta))
        dq = [torch.zeros_like(h) for h in q_h]
        block = _pack(k, v)
        pending: tuple[Tensor, list[Any]] | None = None  # the incoming dK/dV accumulator
        for step in range(cp):
            recv = ring.exchange(block, _KV_TAG) if ring is not None and step < cp - 1 else None
            k_s, v_s = _unpack(block, (k.shape, v.shape))
            k_h, v_h = _halves(k_s, 2), _halves(v_s, 2)
            dk_h = [torch.zeros_like(h, dtype=torch.float32) for h in k_h]
            dv_h = [torch.zeros_like(h, dtype=torch.float32) for h in v_h]
            for hq, hk, mask in blocks.tiles((me - step) % cp):
                dq_t, dk_t, dv_t = _block_backward(q_h[hq], k_h[hk], v_h[hk], dout_h[hq],
                                                   lse_h[hq], delta_h[hq], mask, scale)
                dq[hq] += dq_t
                dk_h[hk] += dk_t
                dv_h[hk] += dv_t
            grads = _pack(torch.cat(dk_h, dim=2), torch.cat(dv_h, dim=2))
            if pending is not None:
                _wait(pending[1])
                grads = grads + pending[0]
            if ring is not None:
                pending = ring.exchange(grads, _GRAD_TAG)
            if recv is not None:
                _wait(recv[1])
                block = recv[0]
        if pending is not None:
            _wait(pending[1])
            grads = pending[0]
        dk, dv = _unpack(grads, (k.shape, v.shape))
        dq_full = torch.cat(dq, dim=3).flatten(1, 2)
        return dq_full.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None


def _gather_positions(position_ids: Tensor, group: dist.ProcessGroup) -> Tensor:
    out: Tensor = funcol.wait_tensor(  # type: ignore[no-untyped-call]
        funcol.all_gather_single(position_ids.contiguous(), 1, group))
    return out


def ring_attention(q: Tensor, k: Tensor, v: Tensor, position_ids: Tensor, causal: bool,
                   group: dist.ProcessGroup | None, scale: float | None = None) -> Tensor:
    """Local queries ``[B, Hq, S, D]`` against the whole sequence's keys/values, whose blocks
    ``[B, Hkv, S, D]`` travel the ring of ``group``; the causal mask compares global
    ``position_ids[B, S]`` (gathered once, as integers). ``group=None`` attends locally."""
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"{q.shape[1]} query heads do not group over {k.shape[1]} KV heads")
    positions = None
    if causal:
        positions = position_ids if group is None else _gather_positions(position_ids, group)
    out: Tensor = RingAttention.apply(  # type: ignore[no-untyped-call]
        q, k, v, positions, group, q.shape[-1] ** -0.5 if scale is None else scale)
    return out


class RingKVAttention:
    """A `CoreAttention.impl` whose K/V blocks travel the cp ring (see `ring_attention`)."""

    def __init__(self, group: dist.ProcessGroup) -> None:
        self.group = group

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, position_ids: Tensor,
                 causal: bool) -> Tensor:
        return ring_attention(q, k, v, position_ids, causal, self.group)
