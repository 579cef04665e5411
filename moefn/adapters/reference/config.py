"""MoEConfig: the frozen, validated shape of the reference MoE transformer.

>>> MoEConfig(vocab_size=64, hidden=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
...           n_experts=8, top_k=2, moe_intermediate=16).n_experts
8
"""

from __future__ import annotations

from typing import Literal

from attrs import Attribute, field, frozen, validators

from moefn.grouped_experts import ExpertsImpl

_positive = validators.ge(1)
_non_negative = validators.ge(0)
_positive_float = validators.gt(0.0)


def _divides_heads(instance: MoEConfig, attribute: Attribute[int], value: int) -> None:
    if instance.n_heads % value:
        raise ValueError(f"n_kv_heads={value} must divide n_heads={instance.n_heads}")


def _even(instance: MoEConfig, attribute: Attribute[int], value: int) -> None:
    if value % 2:
        raise ValueError(f"{attribute.name}={value} must be even (rotary halves)")


def _mla_fits(instance: MoEConfig, attribute: Attribute[int], value: int) -> None:
    if value and not (instance.q_lora_rank and instance.qk_rope_head_dim and instance.v_head_dim):
        raise ValueError("MLA (kv_lora_rank > 0) needs q_lora_rank, qk_rope_head_dim and "
                         "v_head_dim >= 1")


def _top_k_fits(instance: MoEConfig, attribute: Attribute[int], value: int) -> None:
    if value > instance.n_experts:
        raise ValueError(f"top_k={value} exceeds n_experts={instance.n_experts}")


def _groups_fit(instance: MoEConfig, attribute: Attribute[int], value: int) -> None:
    if instance.n_experts % instance.n_group or value > instance.n_group:
        raise ValueError(f"n_group={instance.n_group} must divide n_experts={instance.n_experts} "
                         f"and topk_group={value} be at most n_group")
    pool = value * instance.n_experts // instance.n_group
    if instance.top_k > pool:
        raise ValueError(f"top_k={instance.top_k} exceeds the {pool} experts of "
                         f"topk_group={value} groups")


def _dense_layers_fit(instance: MoEConfig, attribute: Attribute[int], value: int) -> None:
    if value > instance.n_layers:
        raise ValueError(f"n_dense_layers={value} exceeds n_layers={instance.n_layers}")
    if value and instance.dense_intermediate < 1:
        raise ValueError("dense layers need dense_intermediate >= 1")


@frozen(kw_only=True)
class MoEConfig:
    """Shape and options of `MoETransformer`.

    ``n_shared_experts`` (0 = none) sizes one shared SwiGLU of ``n_shared_experts *
    moe_intermediate``; the first ``n_dense_layers`` blocks use a dense SwiGLU of
    ``dense_intermediate`` instead of MoE. ``expert_bias`` adds a DeepSeek-style aux-free bias
    buffer used only to pick the top-k; ``router_fp32`` computes routing in fp32 and marks the
    router fp32-only; ``mtp`` adds one multi-token-prediction block. ``n_group > 1`` limits
    routing to groups (DeepSeek-V3): the experts form ``n_group`` equal contiguous groups, each
    token picks the ``topk_group`` groups whose two best experts score highest, then its top-k
    among their experts.

    ``kv_lora_rank > 0`` makes attention DeepSeek's multi-head latent attention (`MLAttention`):
    queries from a ``q_lora_rank`` latent, keys/values from a ``kv_lora_rank`` latent, each
    head's query/key is ``head_dim`` (no rotary) + ``qk_rope_head_dim`` (rotary; one key rope
    head shared by all heads) wide and its value ``v_head_dim``; ``n_kv_heads`` must equal
    ``n_heads``.

    >>> MoEConfig(vocab_size=8, hidden=8, n_layers=1, n_heads=2, n_kv_heads=3, head_dim=4,
    ...           n_experts=2, top_k=1, moe_intermediate=4)
    Traceback (most recent call last):
    ValueError: n_kv_heads=3 must divide n_heads=2
    """

    vocab_size: int = field(validator=_positive)
    hidden: int = field(validator=_positive)
    n_layers: int = field(validator=_positive)
    n_heads: int = field(validator=_positive)
    n_kv_heads: int = field(validator=[_positive, _divides_heads])
    head_dim: int = field(validator=[_positive, _even])
    n_experts: int = field(validator=_positive)
    top_k: int = field(validator=[_positive, _top_k_fits])
    moe_intermediate: int = field(validator=_positive)
    n_shared_experts: int = field(default=0, validator=_non_negative)
    n_group: int = field(default=1, validator=_positive)
    topk_group: int = field(default=1, validator=[_positive, _groups_fit])
    n_dense_layers: int = field(default=0, validator=[_non_negative, _dense_layers_fit])
    dense_intermediate: int = field(default=0, validator=_non_negative)
    score_func: Literal["softmax", "sigmoid"] = field(
        default="softmax", validator=validators.in_(("softmax", "sigmoid")))
    expert_bias: bool = False
    router_fp32: bool = False
    tie_embeddings: bool = False
    mtp: bool = False
    causal: bool = True
    rope_theta: float = field(default=10000.0, validator=_positive_float)
    norm_eps: float = field(default=1e-6, validator=_positive_float)
    init_std: float = field(default=0.02, validator=_positive_float)
    q_lora_rank: int = field(default=0, validator=_non_negative)
    qk_rope_head_dim: int = field(default=0, validator=[_non_negative, _even])
    v_head_dim: int = field(default=0, validator=_non_negative)
    kv_lora_rank: int = field(default=0, validator=[_non_negative, _mla_fits])
    experts_impl: ExpertsImpl = field(
        default="auto", validator=validators.in_(("auto", "grouped_mm", "loop")))
