"""Named model shapes: tiny ones for tests, a small one for the demo, full-size meta shapes.

>>> get_preset("tiny").n_experts
8
"""

from __future__ import annotations

from attrs import evolve

from moefn.adapters.reference.config import MoEConfig
from moefn.plan.arguments import one_of

_TINY = MoEConfig(vocab_size=64, hidden=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
                  n_experts=8, top_k=2, moe_intermediate=16, n_shared_experts=1)

PRESETS: dict[str, MoEConfig] = {
    "tiny": _TINY,
    # every optional feature: leading dense layer, expert bias, sigmoid, fp32 router, MTP, ties
    "tiny-full": evolve(_TINY, n_layers=3, n_dense_layers=1, dense_intermediate=64,
                        score_func="sigmoid", expert_bias=True, router_fp32=True, mtp=True,
                        tie_embeddings=True),
    # fewer local experts than expert-data-parallel shards at 4 ranks with ep=2
    "tiny-2experts": evolve(_TINY, n_experts=2, top_k=1),
    # bidirectional attention with multi-head (not grouped) KV, for context-parallel tests
    "tiny-bidirectional": evolve(_TINY, causal=False, n_kv_heads=4),
    # DeepSeek-style multi-head latent attention at test size
    "tiny-mla": evolve(_TINY, n_kv_heads=4, q_lora_rank=24, kv_lora_rank=16, qk_rope_head_dim=4,
                       v_head_dim=8),
    # 3 KV heads for 6 query heads: at tp=2 the K/V projections are replicated (tensor parallelism)
    "tiny-kv3": evolve(_TINY, n_heads=6, n_kv_heads=3),
    "small": MoEConfig(vocab_size=256, hidden=64, n_layers=4, n_heads=4, n_kv_heads=2,
                       head_dim=16, n_experts=8, top_k=2, moe_intermediate=32,
                       n_shared_experts=1),
    # DeepSeek-V3: MLA, 671B parameters plus its MTP block (the real one adds ~14B, with its own
    # embedding and head copies; ours shares them: +11.7B); top-8 within 4 of 8 expert groups,
    # no routed scaling
    "deepseek-v3": MoEConfig(vocab_size=129280, hidden=7168, n_layers=61, n_heads=128,
                             n_kv_heads=128, head_dim=128, n_experts=256, top_k=8,
                             moe_intermediate=2048, n_shared_experts=1, n_group=8,
                             topk_group=4, n_dense_layers=3,
                             dense_intermediate=18432, score_func="sigmoid", expert_bias=True,
                             router_fp32=True, mtp=True, q_lora_rank=1536, kv_lora_rank=512,
                             qk_rope_head_dim=64, v_head_dim=128),
    # Qwen3-30B-A3B (without its per-head q/k norms; routing weights are not renormalised)
    "qwen3-30b-a3b": MoEConfig(vocab_size=151936, hidden=2048, n_layers=48, n_heads=32,
                               n_kv_heads=4, head_dim=128, n_experts=128, top_k=8,
                               moe_intermediate=768, rope_theta=1e6),
}


def get_preset(name: str) -> MoEConfig:
    """The preset called ``name``; a PlanError (a ValueError) lists the valid names.

    >>> get_preset("tiny-full").mtp
    True
    """
    one_of(name, tuple(PRESETS), "preset")
    return PRESETS[name]
