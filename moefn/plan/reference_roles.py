"""Recogniser of the reference model, `moefn.adapters.reference.MoETransformer` (pure reads).

Classes are known by name within the reference package (subclasses too), so planning imports no
model code.

>>> ReferenceRecogniser().recognise(object())  # type: ignore[arg-type]
"""

from __future__ import annotations

from torch import nn

from moefn.plan.roles import Fact, Recognition, Role, group_facts

REFERENCE_PACKAGE = "moefn.adapters.reference."


def _kinds(module: object) -> frozenset[str]:
    """Names of the reference classes ``module`` is an instance of."""
    return frozenset(c.__name__ for c in type(module).__mro__
                     if c.__module__.startswith(REFERENCE_PACKAGE))


def is_reference_model(model: nn.Module) -> bool:
    """Whether ``model`` is the reference `MoETransformer` (or a subclass)."""
    return "MoETransformer" in _kinds(model)


def _int(module: nn.Module, name: str) -> int:
    return int(getattr(module, name))


class ReferenceRecogniser:
    """Tags blocks, attention, routers, experts, embeddings, lm_head and MTP of the reference model."""

    name = "moefn"

    def recognise(self, model: nn.Module) -> Recognition | None:
        if not is_reference_model(model):
            return None
        roles: dict[str, set[Role]] = {"": {"backbone"}, "embed": {"embed"},
                                       "lm_head": {"lm_head"}}
        facts: dict[str, tuple[Fact, ...]] = {}
        for path, module in model.named_modules():
            tags = roles.setdefault(path, set())
            kinds = _kinds(module)
            if "Block" in kinds and path.startswith("layers."):
                tags.add("block")
            elif "MTPBlock" in kinds:
                tags.add("mtp")
            elif kinds & {"Attention", "MLAttention"}:
                tags.add("attention")
            elif "CoreAttention" in kinds:
                tags.add("core_attention")
                facts[path] = (("causal", bool(getattr(module, "causal"))),)
            elif "DenseMLP" in kinds and path.endswith(".mlp"):
                tags.add("dense_mlp")
            elif "MoE" in kinds:
                tags.add("moe")
                if getattr(module, "shared") is not None:
                    roles.setdefault(f"{path}.shared", set()).add("shared_experts")
            elif "Router" in kinds:
                tags.add("router")
                facts[path] = (("top_k", _int(module, "top_k")), *group_facts(module))
                if getattr(module, "keep_fp32"):
                    tags.add("keep_fp32")
            elif "GroupedExperts" in kinds:
                tags.add("experts")
                facts[path] = (("num_experts", int(module.get_parameter("gate_up").shape[0])),)
        config = getattr(model, "config")
        # MLA: every head has its own K/V once expanded from the latent (that is what CP
        # gathers); head_dim is the mean of the K and V widths, so 2·n_kv_heads·head_dim is exact
        n_heads = int(config.n_heads)
        kv_heads, head_dim = ((n_heads, (int(config.head_dim) + int(config.qk_rope_head_dim)
                                         + int(config.v_head_dim)) // 2)
                              if config.kv_lora_rank else (int(config.n_kv_heads), int(config.head_dim)))
        for path in [p for p, t in roles.items() if "attention" in t]:
            facts[path] = (("n_heads", n_heads), ("n_kv_heads", kv_heads), ("head_dim", head_dim))
        return Recognition(family="moefn", roles={k: frozenset(v) for k, v in roles.items()},
                           facts=facts)
