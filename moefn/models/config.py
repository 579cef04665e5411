"""MoEConfig: the frozen shape of the reference MoE transformer.

>>> MoEConfig(vocab_size=64, hidden=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
...           n_experts=8, top_k=2, moe_intermediate=16).n_experts
8
"""

from __future__ import annotations

from typing import Literal

from attrs import field, frozen, validators

_positive = validators.ge(1)


def _divides_heads(instance: MoEConfig, attribute: object, value: int) -> None:
    if instance.n_heads % value:
        raise ValueError(f"n_kv_heads={value} must divide n_heads={instance.n_heads}")


def _top_k_fits(instance: MoEConfig, attribute: object, value: int) -> None:
    if value > instance.n_experts:
        raise ValueError(f"top_k={value} exceeds n_experts={instance.n_experts}")


@frozen(kw_only=True)
class MoEConfig:
    vocab_size: int = field(validator=_positive)
    hidden: int = field(validator=_positive)
    n_layers: int = field(validator=_positive)
    n_heads: int = field(validator=_positive)
    n_kv_heads: int = field(validator=[_positive, _divides_heads])
    head_dim: int = field(validator=_positive)
    n_experts: int = field(validator=_positive)
    top_k: int = field(validator=[_positive, _top_k_fits])
    moe_intermediate: int = field(validator=_positive)
    n_shared_experts: int = 0
    n_dense_layers: int = 0
    dense_intermediate: int = 0
    score_func: Literal["softmax", "sigmoid"] = "softmax"
    expert_bias: bool = False
    router_fp32: bool = False
    tie_embeddings: bool = False
    mtp: bool = False
    causal: bool = True
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    init_std: float = 0.02
    experts_impl: Literal["auto", "grouped_mm", "loop"] = "auto"
