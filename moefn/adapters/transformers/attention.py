"""Context parallelism for transformers attention through its attention-function registry.

`register` adds an attention implementation ``"moefn"`` to ``AttentionInterface`` (and a mask
function to ``AttentionMaskInterface`` that builds no mask: the attention builds its own from
global positions). `install_context_parallel` gives one attention module a cp process group and
switches the model's config to ``"moefn"``. The function keeps this rank's queries, all-gathers
keys, values and their ``position_ids`` over the cp group (an autograd all-gather: gradients
reduce-scatter back) before grouped KV heads are expanded, and masks by global position —
causally, within the layer's sliding window or chunk — so the head-tail layout of
`moefn.train.local_batch` works; per-head sink logits (GPT-OSS's ``sinks``) join the softmax.
A layer that counts positions itself (Llama 4: chunks and query temperature tuning) gets its
tokens' indices in the whole sequence (`moefn.adapters.transformers.sequence_positions`).
With ``comm="p2p"`` the K/V blocks travel the cp ring instead (`moefn.realize.ring_attention`,
causal masks only). Modules without a cp group attend locally the same way. Call the model with
``position_ids`` (global positions) and ``use_cache=False``; padding masks are refused (use
``-100`` labels for padding instead), and packed sequences are not supported.

>>> register()  # realize then calls install_context_parallel on each attention (tests/test_hf.py)
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from moefn.adapters.transformers.sequence_positions import (
    sequence_positions,
    take_temperature_tuning,
    tune_temperature,
)
from moefn.plan.options import CpComm
from moefn.realize.context_parallel import attend_all_gathered
from moefn.realize.ring_attention import ring_attention

IMPLEMENTATION = "moefn"
CP_GROUP = "moefn_cp_group"
CP_COMM = "moefn_cp_comm"


def chunk_size(module: nn.Module) -> int | None:
    """The ``attention_chunk_size`` of a layer typed ``"chunked_attention"`` (Llama 4), else None."""
    config = getattr(module, "config", None)
    layer_types, index = getattr(config, "layer_types", None), getattr(module, "layer_idx", None)
    if isinstance(layer_types, (list, tuple)) and isinstance(index, int) and index < len(layer_types) \
            and layer_types[index] == "chunked_attention":
        return int(getattr(config, "attention_chunk_size"))
    return None


def moefn_attention_forward(module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                            attention_mask: Tensor | None, dropout: float = 0.0,
                            scaling: float | None = None, sliding_window: int | None = None,
                            s_aux: Tensor | None = None, **kwargs: Any) -> tuple[Tensor, None]:
    """``query[B,Hq,S,D]``, ``key``/``value[B,Hkv,S,D]`` → ``(out[B,S,Hq,Dv], None)``; the
    layer's ``sliding_window``, chunk (`chunk_size`) and per-head sink logits ``s_aux`` are
    applied by global position, as transformers' own masks and eager attention do."""
    ignored = [name for name in ("sinks", "position_bias") if kwargs.get(name) is not None]
    if ignored:
        raise ValueError(f"moefn attention does not apply {', '.join(ignored)} (e.g. Inkling 2's "
                         "per-token sinks and position bias); leave plan_cp out for this model")
    if attention_mask is not None:
        raise ValueError("moefn attention builds its causal mask from position_ids; a prepared "
                         "attention mask is not supported")
    causal, group = bool(getattr(module, "is_causal", True)), getattr(module, CP_GROUP, None)
    position_ids = kwargs.get("position_ids")
    if not isinstance(position_ids, Tensor):  # a layer that counts positions itself (Llama 4)
        position_ids = sequence_positions(query, group)
    position_ids = position_ids.expand(query.shape[0], -1)
    query = tune_temperature(module, query, position_ids)
    dropout = dropout if module.training else 0.0
    chunk, sinks = chunk_size(module), None if s_aux is None else s_aux.reshape(1, -1, 1, 1)
    if getattr(module, CP_COMM, "all_gather") == "p2p":
        if dropout:
            raise ValueError("ring (p2p) attention has no dropout; set attention_dropout=0")
        if sliding_window or chunk or sinks is not None:
            raise ValueError("ring (p2p) attention masks causally only: this layer has a sliding "
                             "window, chunks or sinks; use plan_cp(comm=\"all_gather\")")
        out = ring_attention(query, key, value, position_ids, causal, group, scaling)
    else:
        out = attend_all_gathered(query, key, value, position_ids, causal, group, scaling,
                                  dropout, sliding_window or None, chunk, sinks)
    return out.transpose(1, 2).contiguous(), None


def moefn_mask(*args: Any, attention_mask: Tensor | None = None, **kwargs: Any) -> None:
    """No mask (the attention builds one from global positions); refuse real padding."""
    if attention_mask is not None and not bool(torch.as_tensor(attention_mask).all()):
        raise ValueError("moefn attention does not support padding masks; pad with label -100 "
                         "and drop attention_mask")
    return None


def register() -> None:
    """Add ``"moefn"`` to transformers' attention and mask implementations (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(IMPLEMENTATION, moefn_attention_forward)
    AttentionMaskInterface.register(IMPLEMENTATION, moefn_mask)


def install_context_parallel(module: nn.Module, group: dist.ProcessGroup,
                             comm: CpComm = "all_gather") -> None:
    """Make ``module`` (a transformers attention) context-parallel over ``group``, its K/V
    all-gathered or (``comm="p2p"``) passed around the ring.

    The switch to ``"moefn"`` is on the module's config (shared by the whole model, as
    ``model.set_attn_implementation`` does).
    """
    register()
    config = getattr(module, "config", None)
    if config is None:
        raise ValueError(f"{type(module).__name__} has no config: not a transformers attention")
    setattr(module, CP_GROUP, group)
    setattr(module, CP_COMM, comm)
    take_temperature_tuning(module)
    config._attn_implementation_internal = IMPLEMENTATION
