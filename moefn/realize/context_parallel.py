"""Context parallelism on any device: each rank keeps its own queries and all-gathers K/V.

The sequence is cut into ``2·cp`` chunks and cp rank ``i`` holds chunks ``i`` and ``2·cp−1−i``
(head-tail), so causal work is even. Keys, values and their global positions are gathered over
the cp group with an autograd all-gather (their gradients reduce-scatter back) before grouped
KV heads are expanded, so only the real KV heads travel; the mask (causal, sliding-window or
chunked) is built from global positions, so it works for any layout, and per-head sink logits
join the softmax exactly.

>>> head_tail_indices(8, cp=2, cp_rank=0).tolist()
[0, 1, 6, 7]
>>> from moefn.launch import one_rank_group
>>> q = k = v = torch.randn(1, 2, 8, 4)  # batch, heads, local sequence, head dim
>>> with one_rank_group() as cp_group:  # realize sets CoreAttention.impl to one of these
...     out = AllGatherKVAttention(cp_group)(q, k, v, torch.arange(8)[None], causal=True)
>>> tuple(out.shape)
(1, 2, 8, 4)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F
from torch import Tensor

from moefn.plan.stages.cp import head_tail_lengths


def check_seq_len(seq_len: int, cp: int) -> None:
    """Raise ValueError (with the nearest valid lengths) unless 2·cp divides ``seq_len``."""
    if seq_len % (2 * cp):
        raise ValueError(f"sequence length {seq_len} is not divisible by 2·cp = {2 * cp} "
                         f"(head-tail layout); use {head_tail_lengths(seq_len, cp)}")


def head_tail_indices(seq_len: int, cp: int, cp_rank: int) -> Tensor:
    """Positions of the full sequence that cp rank ``cp_rank`` holds, in its local order."""
    check_seq_len(seq_len, cp)
    chunk = seq_len // (2 * cp)
    head = torch.arange(cp_rank * chunk, (cp_rank + 1) * chunk)
    tail_start = (2 * cp - 1 - cp_rank) * chunk
    return torch.cat((head, torch.arange(tail_start, tail_start + chunk)))


def shard_sequence(t: Tensor, cp: int, cp_rank: int, dim: int = 1) -> Tensor:
    """This cp rank's head-tail slice of ``t`` along ``dim``."""
    index = head_tail_indices(t.shape[dim], cp, cp_rank).to(t.device)
    return t.index_select(dim, index)


def unshard_sequence(shards: Sequence[Tensor], dim: int = 1) -> Tensor:
    """Restore the full sequence from every cp rank's shard (inverse of `shard_sequence`)."""
    cp = len(shards)
    seq_len = sum(s.shape[dim] for s in shards)
    order = torch.cat([head_tail_indices(seq_len, cp, r) for r in range(cp)])
    gathered = torch.cat(list(shards), dim=dim)
    return gathered.index_select(dim, torch.argsort(order).to(gathered.device))


def _gather_sequence(t: Tensor, dim: int, group: dist.ProcessGroup, grad: bool) -> Tensor:
    gather = funcol.all_gather_single_autograd if grad else funcol.all_gather_single
    out: Tensor = funcol.wait_tensor(gather(t.contiguous(), dim, group))  # type: ignore[no-untyped-call]
    return out


def global_mask(q_pos: Tensor, k_pos: Tensor, window: int | None = None,
                chunk: int | None = None) -> Tensor:
    """Which keys each query sees, ``[B, 1, Sq, Sk]``, from global positions ``q_pos[B, Sq]``
    and ``k_pos[B, Sk]``: causal, within ``window`` positions (``q − window < k ≤ q``) and in
    the same ``chunk`` of positions (sliding-window and chunked attention).

    >>> global_mask(torch.arange(4)[None], torch.arange(4)[None], window=2).int()[0, 0].tolist()
    [[1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1]]
    """
    q, k = q_pos[:, None, :, None], k_pos[:, None, None, :]
    mask = q >= k
    if window is not None:
        mask = mask & (k > q - window)
    if chunk is not None:
        mask = mask & (torch.div(k, chunk, rounding_mode="floor")
                       == torch.div(q, chunk, rounding_mode="floor"))
    return mask


def _attend_with_sinks(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, sinks: Tensor,
                       scale: float | None, dropout: float) -> Tensor:
    """Softmax over the keys and one sink logit per (head, query) that takes weight but gives
    no value (GPT-OSS's ``sinks``): ``sinks`` broadcasts to ``[B, Hq, Sq, 1]``."""
    scores = q @ k.transpose(-1, -2) * (q.shape[-1] ** -0.5 if scale is None else scale)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    sink = sinks.to(scores.dtype).expand(*scores.shape[:-1], 1)
    probs = torch.cat((scores, sink), dim=-1).softmax(-1)[..., :-1]
    return F.dropout(probs, p=dropout) @ v


def attend_all_gathered(q: Tensor, k: Tensor, v: Tensor, position_ids: Tensor, causal: bool,
                        group: dist.ProcessGroup | None, scale: float | None = None,
                        dropout: float = 0.0, window: int | None = None,
                        chunk: int | None = None, sinks: Tensor | None = None) -> Tensor:
    """Local queries ``[B, Hq, S, D]`` against the keys/values of the whole sequence: ``k``/``v``
    ``[B, Hkv, S, D]`` are all-gathered over ``group`` (autograd: gradients reduce-scatter back)
    before grouped heads are expanded; the mask (`global_mask`: causal, a sliding ``window``,
    ``chunk``-ed attention) compares global ``position_ids``, so any layout works; ``sinks``
    (broadcasting to ``[B, Hq, S, 1]``) are extra softmax logits. ``group=None`` attends locally
    the same way."""
    if (window is not None or chunk is not None) and not causal:
        raise ValueError(f"a sliding window ({window}) or chunk ({chunk}) needs causal attention")
    if group is not None:
        k = _gather_sequence(k, 2, group, grad=True)
        v = _gather_sequence(v, 2, group, grad=True)
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    mask = None
    if causal:
        k_pos = position_ids if group is None else _gather_sequence(position_ids, 1, group,
                                                                    grad=False)
        mask = global_mask(position_ids, k_pos, window, chunk)
    if sinks is not None:
        return _attend_with_sinks(q, k, v, mask, sinks, scale, dropout)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, scale=scale)


class AllGatherKVAttention:
    """A `CoreAttention.impl` that attends local queries to the whole sequence's keys/values."""

    def __init__(self, group: dist.ProcessGroup) -> None:
        self.group = group

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, position_ids: Tensor,
                 causal: bool) -> Tensor:
        return attend_all_gathered(q, k, v, position_ids, causal, self.group)
