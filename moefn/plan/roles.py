"""Role recognisers: tag the modules of a known model family (pure reads of the module tree).

Roles: ``backbone, block, attention, core_attention, moe, router, experts, shared_experts,
embed, lm_head, mtp, keep_fp32``. A recogniser returns None for a model it does not know.

>>> [r.name for r in RECOGNISERS][:1]
['moefn']
"""

from __future__ import annotations

from typing import Protocol

from attrs import frozen
from torch import nn

Fact = tuple[str, int | str | bool]


@frozen(kw_only=True)
class Recognition:
    family: str
    roles: dict[str, frozenset[str]]
    facts: dict[str, tuple[Fact, ...]]


class Recogniser(Protocol):
    name: str

    def recognise(self, model: nn.Module) -> Recognition | None: ...


class MoefnRecogniser:
    """Our reference model, `moefn.adapters.reference.MoETransformer`."""

    name = "moefn"

    def recognise(self, model: nn.Module) -> Recognition | None:
        from moefn.adapters.reference import (
            Attention,
            Block,
            CoreAttention,
            GroupedExperts,
            MLAttention,
            MoE,
            MoETransformer,
            MTPBlock,
            Router,
        )

        if not isinstance(model, MoETransformer):
            return None
        roles: dict[str, set[str]] = {"": {"backbone"}, "embed": {"embed"},
                                      "lm_head": {"lm_head"}}
        facts: dict[str, tuple[Fact, ...]] = {}
        for path, module in model.named_modules():
            tags = roles.setdefault(path, set())
            if isinstance(module, Block) and path.startswith("layers."):
                tags.add("block")
            elif isinstance(module, MTPBlock):
                tags.add("mtp")
            elif isinstance(module, (Attention, MLAttention)):
                tags.add("attention")
            elif isinstance(module, CoreAttention):
                tags.add("core_attention")
                facts[path] = (("causal", bool(module.causal)),)
            elif isinstance(module, MoE):
                tags.add("moe")
                if module.shared is not None:
                    roles.setdefault(f"{path}.shared", set()).add("shared_experts")
            elif isinstance(module, Router):
                tags.add("router")
                facts[path] = (("top_k", int(module.top_k)),)
                if module.keep_fp32:
                    tags.add("keep_fp32")
            elif isinstance(module, GroupedExperts):
                tags.add("experts")
                facts[path] = (("num_experts", int(module.gate_up.shape[0])),)
        config = model.config
        # MLA: every head has its own K/V once expanded from the latent (that is what CP
        # gathers); head_dim is the mean of the K and V widths, so 2·n_kv_heads·head_dim is exact
        kv_heads, head_dim = ((config.n_heads, (config.head_dim + config.qk_rope_head_dim
                                                + config.v_head_dim) // 2)
                              if config.kv_lora_rank else (config.n_kv_heads, config.head_dim))
        for path in [p for p, t in roles.items() if "attention" in t]:
            facts[path] = (("n_heads", config.n_heads), ("n_kv_heads", kv_heads),
                           ("head_dim", head_dim))
        return Recognition(family="moefn", roles={k: frozenset(v) for k, v in roles.items()},
                           facts=facts)


class TransformersRecogniser:
    """transformers (>= 5) MoE causal-LM models; imported lazily (``moefn[hf]`` is optional)."""

    name = "transformers"

    def recognise(self, model: nn.Module) -> Recognition | None:
        if not any(c.__module__.startswith("transformers.") for c in type(model).__mro__):
            return None
        from moefn.plan.hf_roles import HFRecogniser

        return HFRecogniser().recognise(model)


RECOGNISERS: tuple[Recogniser, ...] = (MoefnRecogniser(), TransformersRecogniser())
