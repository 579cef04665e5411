"""Matmul FLOPs of a model per token, from its snapshot (pure).

Forward: 2 FLOPs per weight element of every matrix a token meets — dense projections,
routers, shared experts, the head(s), and of the routed experts ``top_k / num_experts`` of each
experts tensor — plus attention scores: ``2·heads·head_dim`` for QKᵀ and again for AV per
context position, the context averaging ``seq/2`` when causal. Backward is twice the forward.

>>> import torch
>>> from moefn.adapters.reference import MoETransformer, get_preset
>>> from moefn.plan.spec import inspect_model
>>> with torch.device("meta"):
...     spec = inspect_model(MoETransformer(get_preset("tiny")))
>>> f = model_flops(spec, seq_len=64)
>>> f.expert > 0 and f.dense > 0
True
"""

from __future__ import annotations

from attrs import frozen

from moefn.plan.spec import ModelSpec


@frozen(kw_only=True)
class ModelFlops:
    """Forward FLOPs per token: non-expert matmuls and attention (``dense``), routed experts
    (``expert``, the active ``top_k`` only)."""

    dense: int
    expert: int


def _under(path: str, roots: tuple[str, ...]) -> str | None:
    return next((r for r in roots if path == r or path.startswith(r + ".")), None)


def model_flops(spec: ModelSpec, seq_len: int) -> ModelFlops:
    """`ModelFlops` of ``spec`` for sequences of ``seq_len`` tokens."""
    experts = spec.paths_with("experts")
    embeds = spec.paths_with("embed")
    heads = spec.paths_with("lm_head")
    active: dict[str, float] = {}
    for path in experts:
        moe = path.rpartition(".")[0]
        router = next((p for p in spec.paths_with("router") if p.rpartition(".")[0] == moe), None)
        k = int(spec.module(router).get("top_k", 1)) if router else 1
        active[path] = k / int(spec.module(path).fact("num_experts"))
    dense = expert = 0.0
    for t in spec.tensors:
        if t.is_buffer or len(t.shape) < 2:
            continue
        owner = _under(t.module_path, experts)
        if owner is not None:
            expert += 2 * t.numel * active[owner]
        elif _under(t.module_path, embeds) is None:
            dense += 2 * t.numel
    if not heads:  # tied head: the embedding's matrix again
        dense += sum(2 * t.numel for t in spec.tensors
                     if _under(t.module_path, embeds) is not None and len(t.shape) == 2)
    for core in spec.paths_with("core_attention"):
        attn = spec.module(core.rpartition(".")[0])
        causal = bool(spec.module(core).get("causal", True))
        context = seq_len / 2 if causal else seq_len
        dense += 4 * int(attn.fact("n_heads")) * int(attn.fact("head_dim")) * context
    return ModelFlops(dense=round(dense), expert=round(expert))
