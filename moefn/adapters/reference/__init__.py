"""The reference MoE transformer (DeepSeek-V3 / Qwen3-MoE shaped) and its presets."""

from moefn.adapters.reference.config import MoEConfig
from moefn.adapters.reference.layers import (
    Attention,
    CoreAttention,
    DenseMLP,
    MLAttention,
    RMSNorm,
    local_attention,
)
from moefn.adapters.reference.moe import GroupedExperts, MoE, Router
from moefn.adapters.reference.presets import PRESETS, get_preset
from moefn.adapters.reference.transformer import (
    Block,
    MoETransformer,
    MTPBlock,
    causal_lm_loss,
    make_batch,
    next_token_labels,
)

__all__ = [
    "PRESETS", "Attention", "Block", "CoreAttention", "DenseMLP", "GroupedExperts", "MoE",
    "MLAttention", "MoEConfig", "MoETransformer", "MTPBlock", "RMSNorm", "Router", "causal_lm_loss",
    "get_preset", "local_attention", "make_batch", "next_token_labels",
]
