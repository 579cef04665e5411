"""DeepSeek-V3 at full width on 1024 fake ranks: the model, its plan and the stand-ins fake tensors
need (used by `tests.test_memtracker` and `tests.test_memory_at_scale`).

The preset is cut in depth only: its dense layers, 3 MoE layers and the MTP block, planned with
``plan_ep() + plan_fsdp()`` on ``dp_shard=1024,ep=64``. `fake_realized` realizes it on torch's fake
process group as one rank and materializes its parameters as fake tensors (no memory).

Stand-ins, because fake tensors hold no values:

* `BalancedDispatch` replaces the EP dispatcher (whose split sizes come from ``.tolist()``):
  each local expert receives ``T*k/local`` rows, what a perfectly balanced all-to-all delivers;
* `bincount` returns its output shape (``minlength``, exact for expert indices);
* `fused_attention` runs ``aten._scaled_dot_product_efficient_attention``, the fused kernel CUDA's
  SDPA picks for MLA's head dims. torch's CPU SDPA has no fused kernel when q/k and v head dims
  differ (DeepSeek: 192 and 128) and falls back to the math kernel, which materialises the
  ``heads × seq × seq`` fp32 scores (8 GiB per layer at seq 4096) — what the estimate assumes
  away (a fused kernel).

None changes which parameters, gradients or optimizer states exist, nor their sizes.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from unittest import mock

import attrs
import torch
from torch import Tensor

from moefn import MeshSpec, compose, plan_ep, plan_fsdp
from moefn.adapters.reference import MoETransformer, get_preset
from moefn.adapters.reference.config import MoEConfig
from moefn.plan.records import ShardPlan
from moefn.realize.dispatch import LocalExpertsFn

MESH = MeshSpec(dp_shard=1024, ep=64)
RANKS = (0, MESH.world_size - 1)


def config() -> MoEConfig:
    """DeepSeek-V3 at full width with its dense layers and 3 MoE layers (and the MTP block).

    grouped_mm runs on fake tensors in bf16 (the plan's param dtype) without reading the counts;
    the loop implementation would need their values.
    """
    preset = get_preset("deepseek-v3")
    return attrs.evolve(preset, n_layers=preset.n_dense_layers + 3, experts_impl="grouped_mm")


def plan() -> ShardPlan:
    with torch.device("meta"):
        model = MoETransformer(config())
    return compose(plan_ep(), plan_fsdp())(model, MESH).unwrap()


class BalancedDispatch:
    """Every local expert gets ``T*k/local`` rows: the shapes of a perfectly balanced all-to-all
    with no data-dependent sizes (fake tensors have no counts to split by)."""

    def __init__(self, num_experts: int, local_experts: int) -> None:
        self.num_experts, self.local = num_experts, local_experts

    def __call__(self, x: Tensor, top_k_index: Tensor, top_k_weights: Tensor,
                 local_fn: LocalExpertsFn) -> Tensor:
        tokens, k = top_k_index.shape
        counts = torch.full((self.local,), tokens * k // self.local, dtype=torch.int64)
        y = local_fn(x.repeat_interleave(k, dim=0), counts)
        weighted = y.view(tokens, k, -1) * top_k_weights.unsqueeze(-1).to(y.dtype)
        return weighted.sum(dim=1).to(x.dtype)


def bincount(input: Tensor, weights: Tensor | None = None, minlength: int = 0) -> Tensor:
    """``bincount``'s shape for indices below ``minlength`` (fake tensors cannot compute it)."""
    return torch.zeros(minlength, dtype=torch.int64, device=input.device)


def fused_attention(q: Tensor, k: Tensor, v: Tensor, position_ids: Tensor, causal: bool) -> Tensor:
    """Memory-efficient SDPA (keeps q, k, v, its output and log-sum-exp; no scores)."""
    out: Tensor = torch.ops.aten._scaled_dot_product_efficient_attention(
        q, k, v, None, True, 0.0, causal)[0]
    return out


@contextmanager
def fake_realized(rank: int) -> Iterator[MoETransformer]:
    """The model realized as ``rank`` of a fake world, its parameters fake tensors; yielded inside
    the `FakeTensorMode` (with `bincount` patched), the stand-ins installed."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from moefn.adapters.reference.layers import CoreAttention
    from moefn.adapters.reference.moe import GroupedExperts
    from moefn.launch import fake_world
    from moefn.realize import build_device_meshes, realize

    cfg, layout = config(), plan()
    with fake_world(MESH.world_size, rank):
        # realize on meta outside FakeTensorMode: realize's agreement step exchanges objects
        with torch.device("meta"):
            model = MoETransformer(cfg)
        realize(layout, model, build_device_meshes(layout.mesh, "cpu"))
        for module in model.modules():
            if isinstance(module, GroupedExperts):
                module.dispatcher = BalancedDispatch(cfg.n_experts, cfg.n_experts // MESH.ep)
            elif isinstance(module, CoreAttention):
                module.impl = fused_attention
        # allow_non_fake_inputs: to_empty turns the meta shards into fake CPU tensors; FSDP2's
        # _apply then re-pads each shard into its padded storage (as at fully_shard time)
        with (FakeTensorMode(allow_non_fake_inputs=True),
              mock.patch.object(torch, "bincount", bincount)):
            model.to_empty(device="cpu")
            # FSDP2's lazy init (else run by the first forward) pads the shards once more: it
            # recognises its own padded storage only for a plain torch.Tensor, not a FakeTensor.
            # Inside a tracker that copy would count as an activation and free the tracked
            # Sharded Param storage of every padded shard; run it before tracking
            model._get_fsdp_state()._lazy_init()  # type: ignore[operator]
            yield model
