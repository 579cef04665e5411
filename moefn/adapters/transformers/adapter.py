"""transformers models' adapter: experts and attention through transformers' own interfaces
(`moefn.adapters.transformers.experts`, `moefn.adapters.transformers.attention`), tensor
parallelism's gathered modules through `moefn.adapters.transformers.tensor_parallel`; routers call
``torch.topk`` themselves, so router-mode checkpointing hooks them."""

from __future__ import annotations

from torch import nn

from moefn.adapters.adapter import Adapter
from moefn.adapters.transformers.attention import install_context_parallel
from moefn.adapters.transformers.experts import install_dispatcher, install_router_replay
from moefn.adapters.transformers.tensor_parallel import install_tensor_parallel
from moefn.plan.hf_roles import HFRecogniser, is_fused_experts, is_transformers_module


def _is_attention(module: nn.Module) -> bool:
    return is_transformers_module(module) and hasattr(module, "config")


TRANSFORMERS = Adapter(
    name="transformers", recogniser=HFRecogniser(), recognise=is_transformers_module,
    accepts_dispatch=is_fused_experts, install_dispatch=install_dispatcher,
    accepts_context_parallel=_is_attention, install_context_parallel=install_context_parallel,
    install_router_replay=install_router_replay, install_tensor_parallel=install_tensor_parallel)
