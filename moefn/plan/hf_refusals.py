"""transformers MoE families moefn refuses by name (``config.model_type``), each with the reason:
their experts are not transformers' fused experts behind its experts interface, and no rule of
`moefn.plan.hf_roles` can split them by expert across EP ranks as one process computes them.

>>> refusal(object()) is None
True
"""

from __future__ import annotations

from moefn.plan.errors import Problem

FIX = ("train it without moefn, or teach moefn its experts with an adapter "
       "(moefn.adapters.registry.register_adapter); docs/models.md lists every transformers MoE "
       "family and what moefn plans of each")

REASONS: dict[str, str] = {
    "dbrx": "DBRX keeps each expert projection of all experts in one 2-D [experts x ffn, hidden] "
            "matrix (experts.mlp.w1, v1, w2) that DbrxExperts loops over, outside transformers' "
            "experts interface, and takes the top-k in the FFN block, not in its router",
    "jetmoe": "JetMoE routes attention heads as well as MLPs (mixture of attention: "
              "self_attention.experts), and both are JetMoeParallelExperts run by its own top-k "
              "gating, outside transformers' experts interface",
    "doge": "Doge's CDMoE experts are single neurons: rows of two embeddings (mlp.up_embed, "
            "mlp.down_embed) picked by product keys (mlp.router_gate) beside a dense MLP; there "
            "are no expert MLPs to place on EP ranks",
    "longcat_flash": "LongCat-Flash routes among n_routed_experts plus zero_expert_num "
                     "zero-computation (identity) experts, and transformers sizes "
                     "experts.gate_up_proj for all of them but experts.down_proj for the routed "
                     "ones only, so the experts cannot be split by expert across EP ranks; each "
                     "decoder layer also holds two attention modules (a ModuleList)",
}


def refusal(model: object) -> Problem | None:
    """Why moefn refuses ``model``'s transformers family, or None."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    reason = REASONS.get(model_type) if isinstance(model_type, str) else None
    if reason is None:
        return None
    return Problem(path="", message=f"transformers MoE family {model_type!r} is not supported",
                   value=reason, fix=FIX)
