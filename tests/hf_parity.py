"""Parity of parallelized transformers MoE models against the same model in one process.

Both models start from the same seeded weights (the parallel one is a deepcopy before realize);
the reference trains on the whole global batch, each rank on its own slice (rows by data-parallel
index, head-tail sequence chunks by cp index). Each rank's loss is the sum of CE over its tokens
divided by the global valid-token count, computed here from the logits (not HF's mean loss).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from attrs import frozen
from torch import nn

from moefn import MeshSpec, compose, stages_from
from moefn.adapters.reference import next_token_labels
from moefn.plan.options import StageOptions
from moefn.plan.records import ShardPlan
from moefn.realize import build_device_meshes, realize
from moefn.train.loop import Batch, local_batch
from tests.parity import planned, train_side_by_side

_COMMON = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, bos_token_id=None, eos_token_id=None, pad_token_id=None)


def _qwen3(**extra: Any) -> Any:
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(**_COMMON, head_dim=8, num_experts=8, num_experts_per_tok=2,
                          moe_intermediate_size=16, intermediate_size=64, **extra)


def _mixtral(**extra: Any) -> Any:
    from transformers import MixtralConfig

    return MixtralConfig(**_COMMON, head_dim=8, num_local_experts=8, num_experts_per_tok=2,
                         intermediate_size=16, **extra)


def _olmoe(**extra: Any) -> Any:
    from transformers import OlmoeConfig

    return OlmoeConfig(**_COMMON, num_experts=8, num_experts_per_tok=2, intermediate_size=16,
                       **extra)


def _qwen2(**extra: Any) -> Any:
    from transformers import Qwen2MoeConfig

    return Qwen2MoeConfig(**_COMMON, num_experts=8, num_experts_per_tok=2,
                          moe_intermediate_size=16, shared_expert_intermediate_size=32,
                          intermediate_size=64, **extra)


def _deepseek_v3(**extra: Any) -> Any:
    from transformers import DeepseekV3Config

    # a dense first layer, 2 expert groups (1 chosen per token), MLA with q-LoRA, shared expert
    common = {**_COMMON, "num_hidden_layers": 3, "num_key_value_heads": 4}
    return DeepseekV3Config(**common, n_routed_experts=8, num_experts_per_tok=2,
                            moe_intermediate_size=16, intermediate_size=64,
                            first_k_dense_replace=1, n_group=2, topk_group=1, q_lora_rank=16,
                            kv_lora_rank=16, qk_rope_head_dim=4, qk_nope_head_dim=4,
                            v_head_dim=8, n_shared_experts=1, **extra)


def _gpt_oss(**extra: Any) -> Any:
    from transformers import GptOssConfig

    return GptOssConfig(**_COMMON, head_dim=8, num_local_experts=8, num_experts_per_tok=2,
                        intermediate_size=16, **extra)


CONFIGS: dict[str, Callable[..., Any]] = {
    "qwen3_moe": _qwen3, "mixtral": _mixtral, "olmoe": _olmoe, "qwen2_moe": _qwen2,
    "deepseek_v3": _deepseek_v3, "gpt_oss": _gpt_oss,
}
EAGER_ONLY = ("gpt_oss",)  # sinks: transformers has no sdpa path for them
# parameters transformers initialises to zero where zero stops gradients, set to one here: Zaya
# scales its keys by a per-K/V-head ``qk_norm.temp`` of zeros, so attention is uniform and
# q/k projections and their convolutions get no gradient even in one process
ONES_INIT: dict[str, tuple[str, ...]] = {"zaya": ("temp",)}
# routers that sample their experts in training (PhiMoE's sparsemixer: Gumbel noise and a random
# Heun mask), which no other process draws alike: in eval mode they take the argmax
SAMPLED_ROUTING = ("phimoe",)


def build_hf(family: str, seed: int = 0, device: str | None = None, **extra: Any) -> nn.Module:
    """A tiny seeded fp32 transformers model; routers get std 1/√H so routing is decisive."""
    from transformers import AutoModelForCausalLM

    from moefn.adapters.transformers.catalogue import tiny_config
    from moefn.plan.hf_roles import router_weight, routers_in

    # the suite's hand-made configs; any other family: docs/models.md's tiny config, eager
    config = CONFIGS[family](**extra) if family in CONFIGS else tiny_config(family, **extra)
    torch.manual_seed(seed)
    attn = "sdpa" if family in CONFIGS and family not in EAGER_ONLY else "eager"
    if device is not None:
        with torch.device(device):
            return AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation=attn)
    model: nn.Module = AutoModelForCausalLM.from_config(config, dtype=torch.float32,
                                                        attn_implementation=attn)
    with torch.no_grad():
        for router in routers_in(model):
            weight = router_weight(router, 1)
            assert weight is not None
            nn.init.normal_(weight, std=weight.shape[1] ** -0.5)
        for name, param in model.named_parameters():
            if name.rpartition(".")[2] in ONES_INIT.get(family, ()):
                nn.init.ones_(param)
    model.train()
    for router in routers_in(model) if family in SAMPLED_ROUTING else ():
        router.eval()
    return model


@frozen(kw_only=True)
class HFCase:
    family: str
    mesh: str
    stages: tuple[StageOptions, ...]
    batch: int = 4
    seq: int = 16
    steps: int = 2
    lr: float = 0.5
    seed: int = 0
    extra: tuple[tuple[str, Any], ...] = ()  # config overrides, e.g. (("tie_word_embeddings", True),)
    control: bool = False  # also measure plain data parallelism on the same slices


def hf_batch(vocab: int, batch: int, seq: int, seed: int) -> Batch:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq), generator=generator)
    return Batch(input_ids=ids, position_ids=torch.arange(seq).expand(batch, seq).contiguous(),
                 labels=next_token_labels(ids))


def logits_of(model: nn.Module, batch: Batch) -> torch.Tensor:
    out = model(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False)
    logits: torch.Tensor = out.logits
    return logits


def build_hf_pair(case: HFCase) -> tuple[nn.Module, nn.Module, ShardPlan]:
    reference = build_hf(case.family, case.seed, **dict(case.extra))
    model = copy.deepcopy(reference)
    mesh = MeshSpec.parse(case.mesh)
    plan = planned(compose(*stages_from(case.stages)), model, mesh)
    realize(plan, model, build_device_meshes(mesh, "cpu"))
    return reference, model, plan


def _record_kept_dtypes(model: nn.Module, plan: ShardPlan) -> dict[str, str]:
    """Record the dtype each parameter a ``keep_fp32`` module holds directly has while the module
    runs forward (an FSDP unit casts its parameters to its ``param_dtype`` there)."""
    seen: dict[str, str] = {}
    for path in plan.model.paths_with("keep_fp32"):
        module = model.get_submodule(path)

        def record(module: nn.Module, args: Any, path: str = path) -> None:
            for name, param in module.named_parameters(recurse=False):
                seen.setdefault(f"{path}.{name}", str(param.dtype))

        module.register_forward_pre_hook(record)
    return seen


def run_hf_parity(rank: int, world: int, case: HFCase) -> dict[str, Any]:
    """`train_side_by_side` for ``case``, plus what realize installed in the HF model and the
    dtypes of the parameters kept in fp32: in forward, and stored after the optimizer steps."""
    reference, model, plan = build_hf_pair(case)
    batch = hf_batch(int(reference.config.vocab_size), case.batch, case.seq, case.seed)
    in_forward = _record_kept_dtypes(model, plan)
    control = copy.deepcopy(reference) if case.control else None
    result = train_side_by_side(reference, model, batch, local_batch(batch, plan.mesh, rank),
                                case.lr, case.steps, lambda m, b: (logits_of(m, b),), control,
                                tp=plan.mesh.tp)
    return {
        **result,
        "kept_in_forward": in_forward,
        "kept_stored": {name: str(model.get_parameter(name).dtype) for name in in_forward},
        "state_dict_keys": list(model.state_dict()),
        "reference_keys": list(reference.state_dict()),
        "experts_implementation": model.config._experts_implementation,
        "attn_implementation": model.config._attn_implementation,
        "reference_implementations": (reference.config._experts_implementation,
                                      reference.config._attn_implementation),
        "stages": plan.stages,
        "installed": installed(model),
    }


def installed(model: nn.Module) -> dict[str, Any]:
    """What realize put into the model: dispatchers, DTensor experts, checkpoints, CP groups."""
    from torch.distributed.tensor import DTensor

    from moefn.adapters.transformers.attention import CP_GROUP
    from moefn.adapters.transformers.sequence_positions import TEMPERATURE
    from moefn.plan.hf_roles import is_fused_experts
    from moefn.realize.routing_tape import REPLAYING

    experts = [m for m in model.modules() if is_fused_experts(m)]
    return {
        "dispatchers": sorted({type(getattr(m, "dispatcher", None)).__name__ for m in experts}),
        "experts_placements": sorted({str(p.placements) for m in experts for p in m.parameters()
                                      if isinstance(p, DTensor)}),
        "plain_expert_params": sum(not isinstance(p, DTensor) for m in experts
                                   for p in m.parameters()),
        "checkpointed": sum(bool(getattr(m, "_moefn_checkpoint", None)) for m in model.modules()),
        "router_replay": sum(bool(getattr(m, REPLAYING, False)) for m in model.modules()),
        "cp_attention": sum(getattr(m, CP_GROUP, None) is not None for m in model.modules()),
        "temperature_tuned": sum(getattr(m, TEMPERATURE, None) is not None for m in model.modules()),
    }


def assert_hf_parity(result: dict[str, Any], tol: float = 1e-5) -> None:
    """Losses and gradients within ``tol``; a gradient plain data parallelism itself gets wrong by
    more (``control_errors``) within twice the control's error. Parameters the loss does not reach
    in one process get no gradient here either, and are a minority."""
    assert result["max_loss_diff"] <= tol, (result["losses"], result["reference"])
    assert result["losses"][-1] < result["losses"][0], result["losses"]  # it trains
    assert not result["zero_grads"], f"zero gradients: {result['zero_grads']}"
    control = result["control_errors"]
    over = {n: (e, control.get(n)) for n, e in result["grad_errors"].items()
            if e > max(tol, 2 * control.get(n, 0.0))}
    assert not over, f"gradient mismatch (error, plain data parallelism's error): {over}"
    assert len(result["unreached"]) < len(result["grad_errors"]) / 2, result["unreached"]
    assert result["state_dict_keys"] == result["reference_keys"]
    assert result["state_dict_keys"] == result["reference_keys"]
