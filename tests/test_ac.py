"""Activation checkpointing on real gloo ranks: parity, router-saving, recompute counts."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from moefn import MeshSpec, compose, plan_ac, plan_ep, plan_fsdp
from moefn.adapters.reference import (
    Block,
    MoETransformer,
    MTPBlock,
    Router,
    causal_lm_loss,
    get_preset,
    make_batch,
)
from moefn.plan.options import ACOptions, Dispatch, EPOptions, FSDPOptions, Mode
from moefn.realize import build_device_meshes, realize
from moefn.realize.activation_checkpointing import install_checkpoint
from moefn.realize.routing_tape import is_recomputing
from moefn.train.loop import global_batch, local_batch
from tests.parity import (
    Case,
    assert_parity,
    build_pair,
    full_grad,
    run_parity,
    worst_relative_error,
)
from tests.ranks import RankPool

FSDP = FSDPOptions(precision="fp32")


def ac(mode: Mode) -> ACOptions:
    return ACOptions(mode=mode)


def ep(dispatch: Dispatch) -> EPOptions:
    return EPOptions(dispatch=dispatch)


CASES = [
    (f"{mode}-{name}", mesh, (*extra, ac(mode), FSDP))
    for mode in ("full", "router", "selective")
    for name, mesh, extra in (
        ("fsdp", "dp_shard=4", ()),
        ("ep-a2a", "dp_shard=4,ep=2", (ep("all_to_all"),)),
        ("ep-ag", "dp_shard=4,ep=2", (ep("all_gather"),)),
    )
]


@pytest.mark.parametrize(("mesh", "stages"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_checkpointing_keeps_losses_and_gradients(ranks: Callable[[int], RankPool], mesh: str,
                                                  stages: Any) -> None:
    case = Case(mesh=mesh, stages=stages, preset="tiny-full")
    assert_parity(ranks(4).run(run_parity, case)[0])


class _CountOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.counts: dict[str, int] = {}

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if is_recomputing():
            name = func.overloadpacket.__name__
            self.counts[name] = self.counts.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


def _run_ac(rank: int, world: int, mode: str, dispatch: str) -> dict[str, Any]:
    """One step of tiny-full under ``mode``; returns loss, grads, counts, recomputed ops."""
    torch.manual_seed(0)
    model = MoETransformer(get_preset("tiny-full"))
    mesh = MeshSpec(dp_shard=world, ep=2)
    stages = [plan_ep(dispatch=dispatch)]  # type: ignore[arg-type]
    if mode != "off":
        stages.append(plan_ac(mode=mode))  # type: ignore[arg-type]
    plan = compose(*stages, plan_fsdp(precision="fp32"))(model, mesh).unwrap()
    realize(plan, model, build_device_meshes(mesh, "cpu"))
    batch = global_batch(model.config, 4, 16, 0)
    mine = local_batch(batch, mesh, rank)
    loss = causal_lm_loss(model(mine.input_ids, mine.position_ids), mine.labels, batch.num_valid)
    counter = _CountOps()
    with counter:
        loss.backward()
    outcome: dict[str, Any] = {"loss": float(loss.detach())}
    outcome["grads"] = {n: p.grad.full_tensor() for n, p in model.named_parameters()}
    outcome["counts"] = {n: b.clone() for n, b in model.named_buffers()
                         if n.endswith("tokens_per_expert")}
    outcome["recomputed"] = counter.counts
    return outcome


def _same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    grads = all(torch.allclose(a["grads"][n], b["grads"][n], rtol=0, atol=1e-6 *
                               float(b["grads"][n].abs().max())) for n in b["grads"])
    return abs(a["loss"] - b["loss"]) <= 1e-6 and grads


def _perturb_bias_on_recompute(router: torch.nn.Module, args: Any) -> None:
    """A router's second call in a step (the recompute) sees another expert bias, swapped in
    without running an op, that sends every token to other experts."""
    if is_recomputing() and router.expert_bias is not None:
        router.expert_bias = router.perturbed_bias


def _grads_after_rerouting(mode: str) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = MoETransformer(get_preset("tiny-full"))
    for module in list(model.modules()):
        routers = [m for m in module.modules() if isinstance(m, Router)]
        if isinstance(module, (Block, MTPBlock)) and routers and mode != "off":
            install_checkpoint(module, mode)
    for router in (m for m in model.modules() if isinstance(m, Router)):
        router.perturbed_bias = torch.arange(router.weight.shape[0], dtype=torch.float32) * 100
        router.register_forward_pre_hook(_perturb_bias_on_recompute)
    ids, pos, labels = make_batch(model.config, 4, 16, seed=0)
    causal_lm_loss(model(ids, pos), labels, int((labels != -100).sum())).backward()
    return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def test_router_saving_survives_rerouting_on_recompute() -> None:
    reference = _grads_after_rerouting("off")
    assert worst_relative_error(_grads_after_rerouting("router"), reference) == 0.0
    assert worst_relative_error(_grads_after_rerouting("selective"), reference) == 0.0  # top-k is saved
    assert worst_relative_error(_grads_after_rerouting("full"), reference) > 0.1  # the test can fail


def test_saved_ops_are_not_recomputed_and_counts_are_not_doubled(
        ranks: Callable[[int], RankPool]) -> None:
    pool = ranks(4)
    off, full, router, selective = (pool.run(_run_ac, mode, "all_to_all")[0]
                                    for mode in ("off", "full", "router", "selective"))

    def recomputed(run: dict[str, Any], op: str) -> int:  # ops seen in backward beyond no-AC's
        return int(run["recomputed"].get(op, 0) - off["recomputed"].get(op, 0))

    routers = 3  # two MoE layers and the MTP block; top-k runs once per router
    assert recomputed(full, "topk") == routers
    assert recomputed(router, "topk") == recomputed(selective, "topk") == 0
    assert recomputed(selective, "mm") == 0 < recomputed(full, "mm")
    assert recomputed(router, "mm") > 0  # router mode recomputes the rest
    for run in (full, router, selective):
        assert all(torch.equal(run["counts"][n], off["counts"][n]) for n in off["counts"])
        assert _same(run, off)


@pytest.mark.parametrize("mode", ["router", "selective"])
def test_checkpointing_with_one_expert_shard(ranks: Callable[[int], RankPool], mode: str) -> None:
    # 2 ranks, ep=2: ep_shard=1 — experts get no FSDP unit, so no FSDP ops run inside the
    # checkpointed block (selective checkpointing replays ops by position)
    case = Case(mesh="dp_shard=2,ep=2", stages=(ep("all_to_all"), ac(mode), FSDP),
                preset="tiny-full")
    assert_parity(ranks(2).run(run_parity, case)[0])


def _bf16_losses_and_grads(rank: int, world: int, mode: str) -> tuple[list[float], dict[str, Any]]:
    case = Case(mesh="dp_shard=4,ep=2", stages=(ep("all_to_all"), ac(mode),
                                                FSDPOptions(precision="bf16")),
                preset="tiny-full")
    reference, model, plan = build_pair(case)
    batch = global_batch(reference.config, 4, 16, 0)
    mine = local_batch(batch, plan.mesh, rank)
    losses = []
    for _ in range(2):
        loss = causal_lm_loss(model(mine.input_ids, mine.position_ids), mine.labels,
                              batch.num_valid)
        loss.backward()
        losses.append(float(loss))
    return losses, {n: full_grad(p) for n, p in model.named_parameters()}


def test_selective_checkpointing_with_nested_bf16_units(ranks: Callable[[int], RankPool]) -> None:
    # fp32 routers and the experts are FSDP units nested in each checkpointed block; FSDP
    # annotates them a different number of times in recompute, which torch's selective
    # checkpointing used to count as a replay mismatch
    pool = ranks(4)
    router_losses, router_grads = pool.run(_bf16_losses_and_grads, "router")[0]
    losses, grads = pool.run(_bf16_losses_and_grads, "selective")[0]
    assert losses == router_losses
    assert all(torch.equal(grads[n], router_grads[n]) and grads[n].abs().sum() > 0 for n in grads)
