"""Full-size transformers MoE shapes, built in code (no download) on the meta device for planning.

Names and config fields are plain data, so the CLI can list them without transformers; building a
config or model imports transformers (``moefn[hf]``).

>>> "hf-deepseek-v3" in HF_PRESETS
True
>>> model = build_hf_model(hf_preset_config("hf-mixtral-8x7b"))  # meta, bf16
>>> round(sum(p.numel() for p in model.parameters()) / 1e9, 1)  # billions of parameters
46.7
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

# name → (transformers model_type, config fields that differ from that config class's defaults)
HF_PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    "hf-qwen3-30b-a3b": ("qwen3_moe", dict(
        vocab_size=151936, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
        num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
        num_experts=128, num_experts_per_tok=8, norm_topk_prob=True, max_position_embeddings=40960,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6}, tie_word_embeddings=False)),
    "hf-qwen3-235b-a22b": ("qwen3_moe", dict(
        vocab_size=151936, hidden_size=4096, intermediate_size=12288, moe_intermediate_size=1536,
        num_hidden_layers=94, num_attention_heads=64, num_key_value_heads=4, head_dim=128,
        num_experts=128, num_experts_per_tok=8, norm_topk_prob=True, max_position_embeddings=40960,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6}, tie_word_embeddings=False)),
    "hf-mixtral-8x7b": ("mixtral", dict(
        vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2,
        sliding_window=None, max_position_embeddings=32768,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6})),
    "hf-deepseek-v3": ("deepseek_v3", dict(
        vocab_size=129280, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
        num_hidden_layers=61, num_attention_heads=128, num_key_value_heads=128,
        n_routed_experts=256, n_shared_experts=1, num_experts_per_tok=8, first_k_dense_replace=3,
        n_group=8, topk_group=4, q_lora_rank=1536, kv_lora_rank=512, qk_rope_head_dim=64,
        qk_nope_head_dim=128, v_head_dim=128, routed_scaling_factor=2.5, norm_topk_prob=True)),
    "hf-olmoe-1b-7b": ("olmoe", dict(
        vocab_size=50304, hidden_size=2048, intermediate_size=1024, num_hidden_layers=16,
        num_attention_heads=16, num_key_value_heads=16, num_experts=64, num_experts_per_tok=8)),
    "hf-qwen1.5-moe-a2.7b": ("qwen2_moe", dict(
        vocab_size=151936, hidden_size=2048, intermediate_size=5632, moe_intermediate_size=1408,
        shared_expert_intermediate_size=5632, num_hidden_layers=24, num_attention_heads=16,
        num_key_value_heads=16, num_experts=60, num_experts_per_tok=4)),
    "hf-gpt-oss-20b": ("gpt_oss", dict(
        vocab_size=201088, hidden_size=2880, intermediate_size=2880, num_hidden_layers=24,
        num_attention_heads=64, num_key_value_heads=8, head_dim=64, num_local_experts=32,
        num_experts_per_tok=4)),
    "hf-gpt-oss-120b": ("gpt_oss", dict(
        vocab_size=201088, hidden_size=2880, intermediate_size=2880, num_hidden_layers=36,
        num_attention_heads=64, num_key_value_heads=8, head_dim=64, num_local_experts=128,
        num_experts_per_tok=4)),
}


def hf_preset_config(name: str) -> Any:
    """The transformers config of preset ``name``; ValueError lists the valid names."""
    if name not in HF_PRESETS:
        raise ValueError(f"unknown transformers preset {name!r}; choose one of {', '.join(HF_PRESETS)}")
    from transformers import AutoConfig

    model_type, fields = HF_PRESETS[name]
    return AutoConfig.for_model(model_type, **fields)


def hf_config_from_json(path: str | Path) -> Any:
    """A transformers config from a ``config.json`` (its ``model_type`` picks the class)."""
    from transformers import AutoConfig

    data = json.loads(Path(path).read_text())
    if not isinstance(data, dict) or "model_type" not in data:
        raise ValueError(f"{path}: not a transformers config.json (no model_type)")
    model_type = data.pop("model_type")
    return AutoConfig.for_model(str(model_type), **data)


def build_hf_model(config: Any, device: str = "meta", dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """``AutoModelForCausalLM.from_config(config)`` on ``device`` (meta: no memory, seconds),
    with the parameters the model keeps in float32 stored so (`keep_fp32`)."""
    from transformers import AutoModelForCausalLM

    from moefn.adapters.transformers.precision import keep_fp32

    auto: Any = AutoModelForCausalLM  # untyped in transformers
    with torch.device(device):
        model: nn.Module = auto.from_config(config, dtype=dtype)
    keep_fp32(model)
    return model
