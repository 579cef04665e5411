"""`moefn.models` moved to `moefn.adapters.reference` (the reference model); this path keeps working."""

from moefn.adapters.reference import (
    PRESETS,
    Attention,
    Block,
    CoreAttention,
    DenseMLP,
    GroupedExperts,
    MLAttention,
    MoE,
    MoEConfig,
    MoETransformer,
    MTPBlock,
    RMSNorm,
    Router,
    causal_lm_loss,
    get_preset,
    local_attention,
    make_batch,
    next_token_labels,
)

__all__ = [
    "PRESETS", "Attention", "Block", "CoreAttention", "DenseMLP", "GroupedExperts", "MoE",
    "MLAttention", "MoEConfig", "MoETransformer", "MTPBlock", "RMSNorm", "Router", "causal_lm_loss",
    "get_preset", "local_attention", "make_batch", "next_token_labels",
]
