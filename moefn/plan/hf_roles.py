"""Recogniser for transformers (>= 5) MoE causal-LM models: pure reads of the module tree.

Recognised: models whose experts are *fused* 3-D parameters behind transformers' experts
interface (``@use_experts_implementation``: Qwen3-MoE, Qwen2-MoE, Mixtral, OLMoE, DeepSeek-V3,
GPT-OSS, ...). Roles: decoder layers ``block``; each layer's attention module ``attention`` and
``core_attention`` (the module whose attention function CP replaces; a ``mask`` fact names its
sinks, sliding window or chunks, and ``cp_supported=False`` with a ``kind`` marks indexed,
compressed or linear attention, which CP refuses); the MoE block ``moe``; its router
``router`` (facts ``top_k`` and, group-limited, ``n_group``/``topk_group``; ``keep_fp32`` when
the model keeps it in fp32, e.g. DeepSeek-V3); the fused experts
``experts`` (fact ``num_experts``); shared experts ``shared_experts``; a dense layer's
feed-forward ``dense_mlp`` (DeepSeek's first layers, Qwen3-MoE's ``mlp_only_layers``: a layer's
child whose parameters are those of its ``gate_proj``, ``up_proj`` and ``down_proj`` linears);
``embed``; ``lm_head``;
the backbone (``model``) ``backbone`` unless the embeddings are tied to the lm_head (a tied weight
must stay with the root FSDP unit, which also runs the lm_head).

Hybrid models: a decoder layer without softmax attention holds a sequence mixer that carries state
along the sequence (Mamba, gated delta-net linear attention, short convolution), recognised by its
kind: the layer's child that holds a causal ``nn.Conv1d`` (role ``mixer``, fact ``kind``: the
config's layer type, such as ``linear_attention`` or ``conv``). Its direct parameters (``A_log``,
``D``, ``dt_bias``: projections and the conv are child modules) are ``keep_fp32``. A layer with
neither is a feed-forward-only layer when the config lists per-layer types (NemotronH's ``moe``
and ``mlp`` layers).

A transformers model without fused experts is not recognised (None); a family of
`moefn.plan.hf_refusals` raises a PlanError with the reason; a transformers MoE model
with pieces missing raises a PlanError that lists what was found and what was expected.

>>> HFRecogniser().recognise(object())  # type: ignore[arg-type]
"""

from __future__ import annotations

import re
from collections.abc import Iterator

from torch import nn

from moefn.plan.errors import PlanError, Problem
from moefn.plan.hf_refusals import cp_refusal, refusal
from moefn.plan.roles import Fact, Recognition, Role, group_facts

TRANSFORMERS_PREFIX = "transformers."
ROUTER_NAMES = ("gate", "router")
SHARED_NAMES = ("shared_expert", "shared_experts", "shared_mlp")
ATTENTION_NAMES = ("self_attn", "attention", "attn")
DENSE_MLP_LINEARS = ("gate_proj", "up_proj", "down_proj")


def is_transformers_module(module: object) -> bool:
    """Whether ``module``'s class (or a base class) is defined inside the transformers package.

    >>> is_transformers_module(object())
    False
    """
    return any(cls.__module__.startswith(TRANSFORMERS_PREFIX) for cls in type(module).__mro__)


def is_fused_experts(module: nn.Module) -> bool:
    """transformers fused experts: 3-D ``gate_up_proj`` (or ``up_proj``) and ``down_proj``
    parameters on a class decorated with ``@use_experts_implementation``, or `is_input_scaled`."""
    if not is_transformers_module(module):
        return False
    own = dict(module.named_parameters(recurse=False))
    up = own.get("gate_up_proj", own.get("up_proj"))
    down = own.get("down_proj")
    if up is None or down is None or up.dim() != 3 or down.dim() != 3:
        return False
    return hasattr(module, "is_transposed") or is_input_scaled(module)


def is_input_scaled(module: nn.Module) -> bool:
    """Llama 4's experts: outside the experts interface, stored ``[E, in, out]``
    (``gate_up_proj [E, H, 2I]``, ``down_proj [E, I, H]``) and run by the MoE block on every
    token with its *input* scaled by the router score (zero for experts not chosen)."""
    own = dict(module.named_parameters(recurse=False))
    up, down = own.get("gate_up_proj"), own.get("down_proj")
    return (not hasattr(module, "is_transposed") and up is not None and down is not None
            and up.dim() == down.dim() == 3 and up.shape[1] == down.shape[2]
            and up.shape[2] == 2 * down.shape[1] and hasattr(module, "act_fn"))


def num_experts(experts: nn.Module) -> int:
    return int(experts.get_parameter("down_proj").shape[0])


def router_weight(router: nn.Module, experts: int) -> nn.Parameter | None:
    """The router's output projection: its last 2-D ``weight`` (its own or a nested Linear's:
    ``router.gate``, ``router.proj``, ``gate.wg``, an MLP's ``out_proj``) with a row per expert,
    plus rows for shared experts (Inkling) or a skip expert (Zaya) when the router scores those."""
    weights = [p for n, p in router.named_parameters()
               if n.rpartition(".")[2] == "weight" and p.dim() == 2 and p.shape[0] >= experts]
    return weights[-1] if weights else None


def router_of(moe: nn.Module, experts: nn.Module) -> tuple[str, nn.Module] | None:
    """The sibling router of ``experts``: a child called gate/router holding a `router_weight`."""
    for name in ROUTER_NAMES:
        child = getattr(moe, name, None)
        if isinstance(child, nn.Module) and router_weight(child, num_experts(experts)) is not None:
            return name, child
    return None


def routers_in(module: nn.Module) -> Iterator[nn.Module]:
    """Every router of a fused-experts MoE block under ``module`` (``module`` included)."""
    for sub in module.modules():
        for child in sub.children():
            if is_fused_experts(child):
                found = router_of(sub, child)
                if found is not None:
                    yield found[1]


def _attention_of(layer: nn.Module) -> tuple[str, nn.Module] | None:
    for name in ATTENTION_NAMES:
        child = getattr(layer, name, None)
        if isinstance(child, nn.Module):
            return name, child
    for name, child in layer.named_children():
        if "Attention" in type(child).__name__:
            return name, child
    return None


def _dense_mlps_of(layer: nn.Module) -> Iterator[str]:
    """Children of ``layer`` that are SwiGLU feed-forwards made of ``DENSE_MLP_LINEARS``."""
    for name, child in layer.named_children():
        linears = {n for n, m in child.named_children() if isinstance(m, nn.Linear)}
        owned = {n.partition(".")[0] for n, _ in child.named_parameters()}
        if linears == owned == set(DENSE_MLP_LINEARS):
            yield name


def _mixer_of(layer: nn.Module) -> tuple[str, nn.Module] | None:
    """The child of ``layer`` that mixes along the sequence with a causal convolution."""
    for name, child in layer.named_children():
        if any(isinstance(m, nn.Conv1d) for m in child.modules()):
            return name, child
    return None


def layer_type(config: object, index: int) -> str | None:
    """The config's kind of decoder layer ``index`` (``layer_types`` or ``layers_block_type``)."""
    for key in ("layer_types", "layers_block_type"):
        types = getattr(config, key, None)
        if isinstance(types, (list, tuple)) and index < len(types):
            return str(types[index])
    return None


def layer_config(config: object, index: int) -> object:
    """The config decoder layer ``index`` reads: a heterogeneous config (DOTS3) refuses its per-
    layer attributes (heads, ...) globally and holds them in ``per_layer_config[index]``."""
    if getattr(config, "is_heterogeneous", False):
        return getattr(config, "per_layer_config")[index]
    return config


CP_LAYER_TYPES = ("full_attention", "attention", "sliding_attention", "chunked_attention")


def _cp_facts(attention: nn.Module, config: object, index: int) -> tuple[Fact, ...]:
    """``mask``: the sinks, sliding window or chunks CP applies by global position (the ring
    refuses them); ``cp_supported=False`` with ``kind`` for other layer types (indexed,
    compressed, linear, ...) and for the families of `moefn.plan.hf_refusals.cp_refusal`, with
    its reason: their attention is more than a masked softmax over K/V."""
    masks = []
    if getattr(attention, "sinks", None) is not None:
        masks.append("attention sinks")
    window = (getattr(attention, "sliding_window") if hasattr(attention, "sliding_window")
              else getattr(config, "sliding_window", None))
    kind = layer_type(config, index)
    if window and kind in (None, "sliding_attention"):
        masks.append(f"sliding_window={window}")
    if kind == "chunked_attention":
        masks.append(f"attention_chunk_size={getattr(config, 'attention_chunk_size', None)}")
    facts: tuple[Fact, ...] = (("mask", ", ".join(masks)),) if masks else ()
    refused = cp_refusal(getattr(config, "model_type", None))
    if refused is not None:
        return (*facts, ("cp_supported", False), ("kind", refused))
    if kind is not None and kind not in CP_LAYER_TYPES:
        return (*facts, ("cp_supported", False), ("kind", ", ".join([*masks, kind])))
    return facts


def _attention_facts(attention: nn.Module, config: object) -> tuple[Fact, ...]:
    """Heads as the attention function sees them. MLA (DeepSeek) expands K/V per head before the
    attention function, so ``n_kv_heads = n_heads`` there; ``head_dim`` is then the mean of the K
    and V head dims, so that the CP estimate's ``2·n_kv_heads·head_dim`` per token is exact."""
    n_heads = int(getattr(config, "num_attention_heads", 0))
    if hasattr(attention, "kv_b_proj"):
        head_dim = (int(getattr(attention, "qk_head_dim")) + int(getattr(attention, "v_head_dim"))) // 2
        return (("n_heads", n_heads), ("n_kv_heads", n_heads), ("head_dim", head_dim))
    n_kv = int(getattr(config, "num_key_value_heads", None) or n_heads)
    head_dim = int(getattr(attention, "head_dim", 0) or getattr(config, "head_dim", 0)
                   or int(getattr(config, "hidden_size", 0)) // max(n_heads, 1))
    return (("n_heads", n_heads), ("n_kv_heads", n_kv), ("head_dim", head_dim))


def _keeps_fp32(model: nn.Module, router_path: str, router: nn.Module) -> bool:
    patterns = list(getattr(model, "_keep_in_fp32_modules_strict", None) or ())
    names = [f"{router_path}.{n}" for n, _ in router.named_parameters(recurse=False)]
    return any(re.search(rf"(^|\.){re.escape(p)}($|\.)", name) for p in patterns for name in names)


def _path_of(model: nn.Module, target: object) -> str | None:
    if not isinstance(target, nn.Module):
        return None
    return next((p for p, m in model.named_modules() if m is target), None)


class _Collector:
    def __init__(self) -> None:
        self.roles: dict[str, set[Role]] = {}
        self.facts: dict[str, tuple[Fact, ...]] = {}
        self.problems: list[Problem] = []

    def tag(self, path: str, *roles: Role) -> None:
        self.roles.setdefault(path, set()).update(roles)

    def missing(self, path: str, piece: str, found: str, expected: str) -> None:
        self.problems.append(Problem(path=path, message=f"transformers MoE model: no {piece}",
                                     value=f"found {found}", fix=f"expected {expected}"))


class HFRecogniser:
    """transformers (>= 5) MoE causal-LM models with fused experts."""

    name = "transformers"

    def recognise(self, model: nn.Module) -> Recognition | None:
        if not is_transformers_module(model):
            return None
        refused = refusal(model)
        if refused is not None:
            raise PlanError([refused])
        experts = [(p, m) for p, m in model.named_modules() if is_fused_experts(m)]
        if not experts:
            return None  # not an MoE model moefn can parallelize: inspect_model says so
        out = _Collector()
        config = getattr(model, "config", None)
        # the base model: ``base_model_prefix``, or ``model`` where the prefix names the
        # multimodal model's child instead (Llama4ForCausalLM: "language_model")
        prefix = next((p for p in (getattr(model, "base_model_prefix", ""), "model")
                       if p and isinstance(getattr(model, p, None), nn.Module)), "")
        backbone = getattr(model, prefix, None) if prefix else None
        backbone_path = prefix if isinstance(backbone, nn.Module) else ""
        base = backbone if isinstance(backbone, nn.Module) else model
        layers = getattr(base, "layers", None)
        found = (f"{type(model).__name__} with {len(experts)} fused experts modules "
                 f"({experts[0][0]}, ...)")
        blocks: list[str] = []
        if config is None:
            out.missing("", "config", found, "a transformers PreTrainedModel (model.config)")
        if not isinstance(layers, nn.ModuleList) or not len(layers):
            out.missing(f"{backbone_path}.layers".lstrip("."), "decoder layers", found,
                        "decoder layers in <backbone>.layers (an nn.ModuleList)")
        else:
            for i, layer in enumerate(layers):
                path = f"{backbone_path}.layers.{i}".lstrip(".")
                blocks.append(path)
                out.tag(path, "block")
                for name in _dense_mlps_of(layer):
                    out.tag(f"{path}.{name}", "dense_mlp")
                attention = _attention_of(layer)
                mixer = _mixer_of(layer) if attention is None else None
                if mixer is not None:
                    mixer_path = f"{path}.{mixer[0]}"
                    out.tag(mixer_path, "mixer", "keep_fp32")
                    out.facts[mixer_path] = (
                        ("kind", layer_type(config, i) or type(mixer[1]).__name__),
                        ("cp_supported", False))
                if attention is None:
                    if mixer is None and layer_type(config, i) is None:
                        children = [n for n, _ in layer.named_children()]
                        out.missing(path, "attention module", f"children {children}",
                                    f"one of {ATTENTION_NAMES} or a sequence mixer (a child "
                                    "holding a causal nn.Conv1d) in each decoder layer")
                    continue
                attn_path = f"{path}.{attention[0]}"
                out.tag(attn_path, "attention", "core_attention")
                own = layer_config(config, i)
                facts = _attention_facts(attention[1], own)
                out.facts[path] = facts  # the CP estimate reads heads on the core's parent
                out.facts[attn_path] = (*facts, ("causal", bool(getattr(attention[1], "is_causal", True))),
                                        *_cp_facts(attention[1], own, i))
        for path, module in experts:
            moe_path = path.rpartition(".")[0]
            moe = model.get_submodule(moe_path)
            out.tag(path, "experts")
            out.facts[path] = (("num_experts", num_experts(module)),)
            out.tag(moe_path, "moe")
            if not any(path.startswith(b + ".") for b in blocks) and blocks:
                out.missing(path, "decoder layer around these experts", found,
                            "fused experts inside a decoder layer")
            router = router_of(moe, module)
            if router is None:
                out.missing(moe_path, "router", f"children {[n for n, _ in moe.named_children()]}",
                            f"a sibling of the experts called one of {ROUTER_NAMES} holding a "
                            f"weight of at least {num_experts(module)} rows (a Linear or an MLP)")
            else:
                router_path = f"{moe_path}.{router[0]}"
                out.tag(router_path, "router")
                top_k = getattr(router[1], "top_k", None)
                if top_k is not None:
                    out.facts[router_path] = (("top_k", int(top_k)), *group_facts(router[1]))
                if _keeps_fp32(model, router_path, router[1]):
                    out.tag(router_path, "keep_fp32")
            for name in SHARED_NAMES:
                if isinstance(getattr(moe, name, None), nn.Module):
                    out.tag(f"{moe_path}.{name}", "shared_experts")
        get_in = getattr(model, "get_input_embeddings", None)
        get_out = getattr(model, "get_output_embeddings", None)
        embed = _path_of(model, get_in()) if callable(get_in) else None
        lm_head = _path_of(model, get_out()) if callable(get_out) else None
        if embed is None:
            out.missing("", "input embeddings", found, "model.get_input_embeddings()")
        else:
            out.tag(embed, "embed")
        if lm_head is None:
            out.missing("", "lm_head", found, "a causal LM (e.g. *ForCausalLM) with "
                                               "model.get_output_embeddings()")
        else:
            out.tag(lm_head, "lm_head")
        if out.problems:
            raise PlanError(out.problems)
        tied = embed is not None and lm_head is not None and any(
            p is q for p in model.get_submodule(embed).parameters()
            for q in model.get_submodule(lm_head).parameters())
        if backbone_path and not tied:
            out.tag(backbone_path, "backbone")
        return Recognition(family=f"transformers:{getattr(config, 'model_type', type(model).__name__)}",
                           roles={k: frozenset(v) for k, v in out.roles.items()}, facts=out.facts)
