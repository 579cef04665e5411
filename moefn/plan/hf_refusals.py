"""transformers MoE families moefn refuses by name (``config.model_type``), each with the reason:
their experts are not transformers' fused experts behind its experts interface, and no rule of
`moefn.plan.hf_roles` can split them by expert across EP ranks as one process computes them
(`refusal`); and families whose attention CP refuses (`cp_refusal`): more than a softmax with
causal, sliding-window, chunked or sink masking over K/V.

>>> refusal(object()) is None
True
>>> cp_refusal("mixtral") is None
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


_CONVOLVED = ("a rank's first tokens need the tokens before them, which another cp rank holds "
              "(the head-tail layout)")
CP_REASONS: dict[str, str] = {
    "inkling_text": "Inkling's attention adds a relative position bias computed from each query's "
                    "hidden state and its distance to each key (InklingRelativeLogits), and "
                    "convolves keys, values and each decoder layer's inputs causally along the "
                    f"sequence (k_sconv, v_sconv, attn_sconv, mlp_sconv): {_CONVOLVED}",
    "inkling2_text": "Inkling 2's attention adds a relative position bias computed from each "
                     "query's hidden state and its distance to each key (relative_position_bias) "
                     "and convolves keys and values causally along the sequence, with kernels "
                     f"computed from the hidden states on its full-attention layers: {_CONVOLVED}",
    "zaya": "ZAYA's compressed convolutional attention mixes queries and keys by causal "
            "convolutions along the sequence (conv_qk_depthwise, conv_qk_grouped) and gives each "
            f"value half of the previous token's projection (v_proj_delayed): {_CONVOLVED}",
}
CP_REASONS["inkling2_loop_text"] = CP_REASONS["inkling2_text"].replace("Inkling 2", "Inkling 2 Loop")


def cp_refusal(model_type: object) -> str | None:
    """Why CP refuses the attention of transformers family ``model_type``, or None."""
    return CP_REASONS.get(model_type) if isinstance(model_type, str) else None
