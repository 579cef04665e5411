"""Which key/value heads a tp rank computes (pure).

Each tp rank runs ``n_heads / tp`` consecutive query heads; query head ``h`` reads K/V head
``h // (n_heads / n_kv_heads)``. K/V heads that divide by tp are split like the queries. Those
that do not are replicated: every rank holds the whole K/V projections and computes only the
heads its query heads read — one when they all read the same head (always so for powers of two),
else one per query head in query order.

>>> kv_heads_read(n_heads=8, n_kv_heads=2, tp=4, rank=3)   # queries 6, 7 read head 1
(1,)
>>> kv_heads_read(n_heads=6, n_kv_heads=3, tp=2, rank=1)   # queries 3, 4, 5 read 1, 2, 2
(1, 2, 2)
>>> kv_heads_read(n_heads=8, n_kv_heads=4, tp=2, rank=1)   # divides: this rank's share
(2, 3)
"""

from __future__ import annotations


def kv_heads_read(n_heads: int, n_kv_heads: int, tp: int, rank: int) -> tuple[int, ...]:
    """The K/V heads tp rank ``rank`` computes; its query head ``j`` reads entry
    ``j // (n_heads / tp / len(result))`` (``n_heads`` divides by tp, ``n_kv_heads`` divides
    ``n_heads``)."""
    local, group = n_heads // tp, n_heads // n_kv_heads
    first = rank * local
    if n_kv_heads % tp == 0:
        share = n_kv_heads // tp
        return tuple(range(rank * share, (rank + 1) * share))
    if group % local == 0:
        return (first // group,)
    return tuple((first + j) // group for j in range(local))


def local_kv_heads(n_heads: int, n_kv_heads: int, tp: int) -> int:
    """How many K/V heads each tp rank computes (the same on every rank).

    >>> local_kv_heads(64, 8, 16), local_kv_heads(6, 3, 2), local_kv_heads(8, 4, 2)
    (1, 3, 2)
    """
    return len(kv_heads_read(n_heads, n_kv_heads, tp, 0))


__all__ = ["kv_heads_read", "local_kv_heads"]
