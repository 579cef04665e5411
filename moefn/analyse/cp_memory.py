"""K/V bytes one context-parallel attention holds on a rank (pure): the all-gather's O(seq)
against the ring's O(seq/cp).

With ``tokens`` local tokens and ``kv = 2·tokens·n_kv_heads·head_dim·act`` bytes of local K+V:

- ``"all_gather"``: the whole sequence's K/V, ``cp·kv``, which attention also saves for
  backward (and backward holds their gradients, ``cp·kv`` more, before the reduce-scatter);
- ``"p2p"`` (ring): its own block and one incoming, ``2·kv``; the saved K/V are its own ``kv``
  (backward adds two fp32 dK/dV accumulators, its own and one incoming: ``2·kv·4/act``).

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
