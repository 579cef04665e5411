"""K/V bytes one context-parallel attention holds on a rank (pure): the all-gather's O(seq)
against the ring's O(seq/cp).

With ``tokens`` local tokens and ``kv = 2·tokens·n_kv_heads·head_dim·act`` bytes of local K+V:

- ``"all_gather"``: the whole sequence's K/V, ``cp·kv``, which attention also saves for
  backward (and backward holds their gradients, ``cp·kv`` more, before the reduce-scatter);
- ``"p2p"`` (ring): its own block and one incoming, ``2·kv``; the saved K/V are its own ``kv``.
  What the ring's backward holds on top of what it saved is `ring_backward_bytes`.

Causal attention also gathers every rank's positions (int64): ``8·tokens·cp`` either way.

>>> import torch
>>> from moefn import MeshSpec, compose, plan_cp
>>> from moefn.adapters.reference import MoETransformer, get_preset
>>> with torch.device("meta"):
...     model = MoETransformer(get_preset("tiny"))
>>> def kv(comm):
...     plan = compose(plan_cp(seq_len=64, comm=comm))(model, MeshSpec(cp=4)).unwrap()
...     return cp_kv_bytes(plan, tokens=16, activation_bytes=4)
>>> kv("all_gather"), kv("p2p")
(8704, 4608)
"""

from __future__ import annotations

import math

from moefn.plan.records import ContextParallelAttention, ShardPlan

_POSITION_BYTES = 8


def kv_bytes(comm: str, kv: int, cp: int) -> int:
    """Forward K/V working set of one attention: ``cp·kv`` all-gathered, ``2·kv`` on the ring.

    >>> kv_bytes("all_gather", kv=1024, cp=4), kv_bytes("p2p", kv=1024, cp=4)
    (4096, 2048)
    """
    return 2 * kv if comm == "p2p" and cp > 1 else cp * kv


def cp_kv_bytes(plan: ShardPlan, tokens: int, activation_bytes: int) -> int:
    """The largest forward K/V working set (with gathered positions) of the plan's CP
    attentions on a rank with ``tokens`` local tokens (0 without CP)."""
    most = 0
    for step in plan.steps_of(ContextParallelAttention):
        cp = math.prod(plan.mesh.size(a) for a in step.mesh_dims)
        heads = plan.model.module(step.path.rpartition(".")[0])
        causal = bool(plan.model.module(step.path).get("causal", True))
        kv = 2 * tokens * int(heads.fact("n_kv_heads")) * int(heads.fact("head_dim")) * activation_bytes
        positions = _POSITION_BYTES * tokens * cp if causal else 0
        most = max(most, kv_bytes(step.comm, kv, cp) + positions)
    return most


def ring_backward_bytes(tokens: int, seq: int, heads: int, kv_heads: int, dim: int, v_dim: int,
                        activation_bytes: int, cp: int, causal: bool) -> int:
    """Bytes `moefn.realize.ring_attention.RingAttention.backward` holds besides its saved
    tensors, at its peak (``tokens = rows·seq`` local tokens, ``seq`` the local sequence).

    Read off the code: the incoming dO (``act``), dQ (fp32), delta (fp32 per head), q and dO
    upcast to fp32 (not in fp32), the previous tile's dQ/dK/dV (still bound), and four fp32
    ``[rows, heads, seq/2, seq/2]`` score tiles at once (scores, probs, ``dO·Vᵀ − delta``,
    their product) with this tile's K/V half in fp32 (not in fp32). Per ring step ``s``:
    the K/V block (``act``) and, before the last step, the incoming one; the step's fp32 dK/dV
    accumulator, and from step 1 the incoming accumulator and the one sent (its send still
    holds it); on the own step the causal block's two boolean masks.

    >>> ring_backward_bytes(256, 256, heads=4, kv_heads=2, dim=16, v_dim=16,
    ...                     activation_bytes=4, cp=2, causal=True)  # measured: 1,513,480
    1511424
    """
    f32 = 4
    upcast = activation_bytes != f32
    block = activation_bytes * tokens * kv_heads * (dim + v_dim)
    acc = f32 * tokens * kv_heads * (dim + v_dim)
    tile = f32 * heads * tokens * seq // 4  # rows·(seq/2)² scores per head
    fixed = (activation_bytes * tokens * heads * v_dim + f32 * tokens * heads * dim
             + f32 * tokens * heads + (f32 * tokens * heads * (dim + v_dim) if upcast else 0)
             + f32 * tokens * heads * dim // 2 + acc // 2 + 4 * tile
             + (acc // 2 if upcast else 0))
    masks = tokens * seq // 2 if causal else 0  # two rows·(seq/2)² booleans
    steps = max(block * (1 + (s < cp - 1)) + acc * (1 + 2 * (s >= 1)) + (masks if s == 0 else 0)
                for s in range(cp))
    return fixed + steps
