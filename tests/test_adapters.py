"""A model kind moefn does not know, taught to it from outside: one `Adapter`, registered once.

The toy model below (its own attention, router and experts classes, written here) is planned
with CP, EP, router-mode AC and FSDP and realized on real gloo ranks through nothing but
`register_adapter`; it must train like the same model in one process.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.distributed import ProcessGroup
from torch.distributed.tensor import DTensor

from moefn import MeshSpec, PlanError, compose, plan_ac, plan_cp, plan_ep, plan_fsdp
from moefn.adapters import registry
from moefn.adapters.adapter import Adapter
from moefn.adapters.reference import get_preset
from moefn.adapters.registry import adapter_for, register_adapter
from moefn.plan import spec
from moefn.plan.options import CpComm
from moefn.plan.roles import Fact, Recognition, Role
from moefn.realize import build_device_meshes, realize
from moefn.realize.context_parallel import attend_all_gathered
from moefn.realize.dispatch import Dispatcher, LocalDispatch
from moefn.realize.routing_tape import REPLAYING, replay_topk
from moefn.train.loop import global_batch, local_batch
from tests.parity import assert_parity, planned, train_side_by_side
from tests.ranks import RankPool

VOCAB, HIDDEN, HEADS, FFN, EXPERTS, TOP_K, LAYERS = get_preset("tiny").vocab_size, 32, 4, 24, 4, 2, 2


def _local(t: Tensor) -> Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


class ToyAttention(nn.Module):
    """Causal self-attention over global positions; a cp group makes it see every rank's K/V."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(HIDDEN, 3 * HIDDEN, bias=False)
        self.out = nn.Linear(HIDDEN, HIDDEN, bias=False)
        self.cp_group: ProcessGroup | None = None

    def forward(self, x: Tensor, position_ids: Tensor) -> Tensor:
        b, s, h = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, HEADS, h // HEADS).permute(2, 0, 3, 1, 4)
        o = attend_all_gathered(q, k, v, position_ids, True, self.cp_group)
        out: Tensor = self.out(o.transpose(1, 2).reshape(b, s, h))
        return out


class ToyRouter(nn.Module):
    """Softmax scores, ``torch.topk`` called directly (no moefn routing API)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(EXPERTS, HIDDEN) * HIDDEN ** -0.5)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        weights, index = torch.topk((x @ self.weight.t()).softmax(-1), TOP_K, dim=-1)
        return index, weights / weights.sum(-1, keepdim=True)


class ToyExperts(nn.Module):
    """Expert e: ``relu(x @ w_in[e]) @ w_out[e]``, one loop per local expert."""

    def __init__(self) -> None:
        super().__init__()
        self.w_in = nn.Parameter(torch.randn(EXPERTS, HIDDEN, FFN) * HIDDEN ** -0.5)
        self.w_out = nn.Parameter(torch.randn(EXPERTS, FFN, HIDDEN) * FFN ** -0.5)
        self.dispatcher: Dispatcher = LocalDispatch(EXPERTS)

    def forward(self, x: Tensor, index: Tensor, weights: Tensor) -> Tensor:
        return self.dispatcher(x, index, weights, self._local_experts)

    def _local_experts(self, x_sorted: Tensor, counts: Tensor) -> Tensor:
        w_in, w_out = _local(self.w_in), _local(self.w_out)
        rows = torch.split(x_sorted, counts.tolist())
        return torch.cat([torch.relu(r @ w_in[e]) @ w_out[e] for e, r in enumerate(rows)])


class ToyMoE(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.router, self.experts = ToyRouter(), ToyExperts()

    def forward(self, x: Tensor) -> Tensor:
        flat = x.reshape(-1, x.shape[-1])
        index, weights = self.router(flat)
        out: Tensor = self.experts(flat, index, weights)
        return out.view_as(x)


class ToyBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(HIDDEN), nn.LayerNorm(HIDDEN)
        self.attn, self.moe = ToyAttention(), ToyMoE()

    def forward(self, x: Tensor, position_ids: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x), position_ids)
        out: Tensor = x + self.moe(self.norm2(x))
        return out


class ToyModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, HIDDEN)
        self.layers = nn.ModuleList(ToyBlock() for _ in range(LAYERS))
        self.norm = nn.LayerNorm(HIDDEN)
        self.lm_head = nn.Linear(HIDDEN, VOCAB, bias=False)

    def forward(self, input_ids: Tensor, position_ids: Tensor) -> tuple[Tensor]:
        x = self.embed(input_ids)
        for layer in self.layers:
            x = layer(x, position_ids)
        return (self.lm_head(self.norm(x)),)


class ToyRecogniser:
    """Roles and facts of `ToyModel` (what planning needs; pure reads)."""

    name = "toy"

    def recognise(self, model: nn.Module) -> Recognition | None:
        if not isinstance(model, ToyModel):
            return None
        kinds: dict[type, tuple[frozenset[Role], Callable[[nn.Module], tuple[Fact, ...]]]] = {
            ToyBlock: (frozenset({"block"}), lambda m: ()),
            ToyAttention: (frozenset({"attention", "core_attention"}), lambda m: (
                ("n_heads", HEADS), ("n_kv_heads", HEADS), ("head_dim", HIDDEN // HEADS),
                ("causal", True))),
            ToyMoE: (frozenset({"moe"}), lambda m: ()),
            ToyRouter: (frozenset({"router"}), lambda m: (("top_k", TOP_K),)),
            ToyExperts: (frozenset({"experts"}), lambda m: (("num_experts", EXPERTS),)),
        }
        roles: dict[str, frozenset[Role]] = {"": frozenset({"backbone"}),
                                             "embed": frozenset({"embed"}),
                                             "lm_head": frozenset({"lm_head"})}
        facts: dict[str, tuple[Fact, ...]] = {}
        for path, module in model.named_modules():
            if type(module) in kinds:
                roles[path], read = kinds[type(module)]
                facts[path] = read(module)
        return Recognition(family="toy", roles=roles, facts=facts)


def _install_cp(module: nn.Module, group: ProcessGroup, comm: CpComm) -> None:
    if comm != "all_gather":
        raise ValueError(f"ToyAttention all-gathers K/V only, not comm={comm!r}")
    setattr(module, "cp_group", group)


def _install_dispatch(module: nn.Module, dispatcher: Dispatcher, block: nn.Module) -> None:
    setattr(module, "dispatcher", dispatcher)


def _replay_routers(block: nn.Module) -> None:
    for module in block.modules():
        if isinstance(module, ToyRouter):
            replay_topk(module)


def _is_toy(module: nn.Module) -> bool:
    return isinstance(module, ToyModel)


def _is_experts(module: nn.Module) -> bool:
    return isinstance(module, ToyExperts)


def _is_attention(module: nn.Module) -> bool:
    return isinstance(module, ToyAttention)


TOY = Adapter(name="toy", recogniser=ToyRecogniser(), recognise=_is_toy,
              accepts_dispatch=_is_experts, install_dispatch=_install_dispatch,
              accepts_context_parallel=_is_attention, install_context_parallel=_install_cp,
              install_router_replay=_replay_routers)
MESH = MeshSpec(dp_shard=2, cp=2, ep=2)
SEQ = 16


@contextlib.contextmanager
def _toy_registered() -> Iterator[None]:
    """TOY registered for the block only: the registry is process-wide, and later tests in this
    process (or rank worker) must see moefn's own kinds alone."""
    adapters, recognisers = list(registry._REGISTERED), list(spec.RECOGNISERS)
    try:
        register_adapter(TOY)
        yield
    finally:
        registry._REGISTERED[:], spec.RECOGNISERS[:] = adapters, recognisers


def _toy_parity(rank: int, world: int) -> dict[str, Any]:
    with _toy_registered():
        return _toy_parity_registered(rank)


def _toy_parity_registered(rank: int) -> dict[str, Any]:
    torch.manual_seed(0)
    reference = ToyModel()
    model = copy.deepcopy(reference)
    plan = planned(compose(plan_cp(seq_len=SEQ), plan_ep(), plan_ac(mode="router"),
                           plan_fsdp(precision="fp32")), model, MESH)
    realize(plan, model, build_device_meshes(MESH, "cpu"))
    batch = global_batch(get_preset("tiny"), 4, SEQ, seed=0)
    result = train_side_by_side(reference, model, batch, local_batch(batch, MESH, rank),
                                lr=0.25, steps=3)
    modules = list(model.modules())
    return {**result, "stages": plan.stages, "installed": {
        "dispatchers": sorted({type(m.dispatcher).__name__ for m in modules
                               if isinstance(m, ToyExperts)}),
        "cp_groups": sum(isinstance(m, ToyAttention) and m.cp_group is not None
                         for m in modules),
        "replaying_routers": sum(bool(getattr(m, REPLAYING, False)) for m in modules)}}


def test_a_model_kind_registered_from_outside_trains_like_one_process(
        ranks: Callable[[int], RankPool]) -> None:
    for result in ranks(4).run(_toy_parity):
        assert result["stages"] == ("cp", "ep", "ac", "fsdp")
        assert result["installed"] == {"dispatchers": ["AllToAllDispatch"], "cp_groups": LAYERS,
                                       "replaying_routers": LAYERS}
        assert_parity(result)  # losses and every gradient within 1e-5, none zero
        assert result["losses"][-1] < result["losses"][0]


def test_the_registry_finds_each_kind_and_refuses_a_second_adapter_of_one_name() -> None:
    with _toy_registered():
        register_adapter(TOY)  # again: nothing changes
        assert adapter_for(ToyModel()) is TOY
        with pytest.raises(PlanError, match="another adapter has this name"):
            register_adapter(Adapter(
                name="toy", recogniser=ToyRecogniser(), recognise=_is_toy,
                accepts_dispatch=_is_experts, install_dispatch=_install_dispatch,
                accepts_context_parallel=_is_attention, install_context_parallel=_install_cp))
    assert adapter_for(ToyModel()) is None


def test_realize_does_not_know_transformers() -> None:
    realize_dir = Path(__file__).parents[1] / "moefn" / "realize"
    mentions = [p.name for p in sorted(realize_dir.glob("*.py"))
                if "transformers" in p.read_text().lower()]
    assert not mentions, f"realize/ should reach model kinds only through adapters: {mentions}"
