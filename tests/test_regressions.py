"""Regression tests: one per classic bug of MoE parallelizers, each asserting moefn lacks it.

All multi-rank work runs on the 4-rank pool, several cases per call.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from moefn import MeshSpec, compose, plan_ac, plan_ep, plan_fsdp
from moefn.adapters.reference import (
    Block,
    MoETransformer,
    MTPBlock,
    Router,
    causal_lm_loss,
    get_preset,
    make_batch,
    next_token_labels,
)
from moefn.grouped_experts import run_grouped_experts
from moefn.plan.compose import Stage
from moefn.plan.options import ACOptions, CPOptions, Dispatch, EPOptions, FSDPOptions, StageOptions
from moefn.plan.stages import stages_from
from moefn.realize import build_device_meshes, realize
from moefn.realize.activation_checkpointing import install_checkpoint
from moefn.realize.dispatch import LocalDispatch
from moefn.realize.ep_dispatch import AllGatherDispatch, AllToAllDispatch
from moefn.realize.routing_tape import is_recomputing
from moefn.train.loop import Batch, global_batch, local_batch
from tests.parity import Case, assert_parity, build_pair, full_grad, run_parity
from tests.ranks import RankPool

WORLD = 4
Stages = tuple[StageOptions, ...]
FSDP32 = FSDPOptions(precision="fp32")


def ep(dispatch: Dispatch = "all_to_all") -> EPOptions:
    return EPOptions(dispatch=dispatch)


def _parities(rank: int, world: int, cases: list[Case]) -> list[dict[str, Any]]:
    return [run_parity(rank, world, case) for case in cases]


def _full(t: Tensor) -> Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def _relative(got: Tensor, want: Tensor) -> float:
    return float((got - want).abs().max()) / max(float(want.abs().max()), 1e-30)


# ---------------------------------------------------------------------------------------------
# 1. Expert gradients scaled by the expert mesh instead of the full data-parallel degree: every
#    gradient of tests/test_ep.py's layouts (fsdp and alone, ep 2 and 4, HSDP) and test_cp.py's
#    cp=2 × ep=2 is compared with one process; a scaling by ep_shard / world is off by 50 %.
# ---------------------------------------------------------------------------------------------

# ---------------------------------------------------------------------------------------------
# 2. EP deadlock with unequal tokens per rank (0 included)
# ---------------------------------------------------------------------------------------------

E, H, INTER, K = 8, 16, 8, 2
TOKENS = [(5, 0, 11, 1), (0, 0, 3, 0), (0, 0, 0, 0), (2, 9, 0, 4), (1, 1, 1, 1)]


def _dispatch_unequal(rank: int, world: int) -> list[str]:
    """Both dispatchers on ep=2 and ep=4, token counts differing per rank and per call."""
    failures = []
    gen = torch.Generator().manual_seed(0)
    gate_up = torch.randn(E, H, 2 * INTER, generator=gen) * 0.3
    down = torch.randn(E, INTER, H, generator=gen) * 0.3
    for ep_size in (2, 4):
        meshes = build_device_meshes(MeshSpec(dp_shard=world, ep=ep_size), "cpu")
        group = meshes.group(("ep",))
        lo = dist.get_rank(group) * (E // ep_size)
        mine = slice(lo, lo + E // ep_size)
        for kind in (AllToAllDispatch, AllGatherDispatch):
            for step, counts in enumerate(TOKENS):
                seed = 1000 * ep_size + 10 * step + rank
                g = torch.Generator().manual_seed(seed)
                tokens = counts[rank]
                x = torch.randn(tokens, H, generator=g)
                index = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(tokens)]) \
                    if tokens else torch.zeros(0, K, dtype=torch.long)
                w = torch.rand(tokens, K, generator=g) + 0.1
                # distributed: local expert slice
                xd, wd = x.clone().requires_grad_(), w.clone().requires_grad_()
                gu, dn = gate_up[mine].clone().requires_grad_(), down[mine].clone().requires_grad_()
                y = kind(E, group)(xd, index, wd, lambda xs, c, gu=gu, dn=dn: run_grouped_experts(
                    xs, c, gu, dn))
                y.square().sum().backward()
                # reference: every expert local, this rank's tokens only
                xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
                gur, dnr = gate_up.clone().requires_grad_(), down.clone().requires_grad_()
                yr = LocalDispatch(E)(xr, index, wr, lambda xs, c, gu=gur, dn=dnr:
                                      run_grouped_experts(xs, c, gu, dn))
                yr.square().sum().backward()
                assert gur.grad is not None and dnr.grad is not None
                for t in (gur.grad, dnr.grad):  # expert grads: summed over the EP group's tokens
                    dist.all_reduce(t, group=group)
                where = f"{kind.__name__} ep={ep_size} tokens={counts}"
                pairs = [(y, yr, "y"), (xd.grad, xr.grad, "grad x"), (wd.grad, wr.grad, "grad w"),
                         (gu.grad, gur.grad[mine], "grad gate_up"), (dn.grad, dnr.grad[mine], "grad down")]
                for got, want, what in pairs:
                    if got is None or want is None or got.shape != want.shape or (
                            want.numel() and _relative(got, want) > 1e-5):
                        failures.append(f"{where}: {what}")
    return failures


def test_ep_dispatch_with_unequal_and_zero_tokens_per_rank_neither_hangs_nor_drifts(
        ranks: Callable[[int], RankPool]) -> None:
    # a deadlock shows as the pool's timeout; a wrong split as a mismatch
    for failures in ranks(WORLD).run(_dispatch_unequal):
        assert failures == []


SEQ_PER_RANK = (16, 3, 9, 1)


def _unequal_rows_end_to_end(rank: int, world: int, forced: bool) -> dict[str, float]:
    """A realized EP+FSDP model where every rank has its own sequence length (so its own token
    count), against one process that sees all ranks' sequences."""
    torch.manual_seed(0)
    reference = MoETransformer(get_preset("tiny-full"))
    if forced:  # every token to experts 0 and 1: the second rank of each EP pair gets none
        for router in (m for m in reference.modules() if isinstance(m, Router)):
            assert router.expert_bias is not None
            router.expert_bias[[0, 1]] = 1e3
    model = copy.deepcopy(reference)
    mesh = MeshSpec(dp_shard=world, ep=2)
    plan = compose(plan_ep(), plan_fsdp(precision="fp32"))(model, mesh).unwrap()
    realize(plan, model, build_device_meshes(mesh, "cpu"))
    batches = []
    for r, seq in enumerate(SEQ_PER_RANK):
        ids = torch.randint(0, 64, (1, seq), generator=torch.Generator().manual_seed(r))
        batches.append((ids, torch.arange(seq)[None], next_token_labels(ids)))
    total = sum(int((labels != -100).sum()) for _, _, labels in batches)
    ids, pos, labels = batches[rank]
    loss = causal_lm_loss(model(ids, pos), labels, total)
    loss.backward()
    ref_loss = sum(causal_lm_loss(reference(i, p), lab, total) for i, p, lab in batches)
    assert isinstance(ref_loss, Tensor)
    ref_loss.backward()
    summed = loss.detach().clone()
    dist.all_reduce(summed)
    ref_params = dict(reference.named_parameters())
    worst = max(_relative(full_grad(p), full_grad(ref_params[n]))
                for n, p in model.named_parameters() if float(full_grad(ref_params[n]).abs().max()))
    return {"loss": abs(float(summed) - float(ref_loss)), "grad": worst}


@pytest.mark.parametrize("forced", [False, True], ids=["own-lengths", "own-lengths-one-expert-rank"])
def test_realized_ep_model_with_different_token_counts_per_rank(
        ranks: Callable[[int], RankPool], forced: bool) -> None:
    for result in ranks(WORLD).run(_unequal_rows_end_to_end, forced):
        assert result["loss"] <= 1e-5 and result["grad"] <= 1e-5, result


# ---------------------------------------------------------------------------------------------
# 3. Router recompute under activation checkpointing changing the routing
# ---------------------------------------------------------------------------------------------


def _perturb_bias_on_recompute(router: nn.Module, args: Any) -> None:
    """Recompute (the router's forward during backward) sees a bias that routes every token to
    the last experts; only a router whose choice is replayed keeps the forward's routing. The
    bias is swapped in without running an op (selective checkpointing counts ops)."""
    if is_recomputing() and router.expert_bias is not None:
        router.expert_bias = router.perturbed_bias


def _arm_routers(model: nn.Module) -> None:
    for router in (m for m in model.modules() if isinstance(m, Router)):
        router.perturbed_bias = torch.arange(router.weight.shape[0], dtype=torch.float32) * 100
        router.register_forward_pre_hook(_perturb_bias_on_recompute)


def _rerouted_grads(rank: int, world: int, mode: str) -> dict[str, Tensor]:
    torch.manual_seed(0)
    model = MoETransformer(get_preset("tiny-full"))
    mesh = MeshSpec(dp_shard=world, ep=2)
    stages: list[Stage] = [plan_ep()]
    if mode != "off":
        stages.append(plan_ac(mode=mode))  # type: ignore[arg-type]
    plan = compose(*stages, plan_fsdp(precision="fp32"))(model, mesh).unwrap()
    realize(plan, model, build_device_meshes(mesh, "cpu"))
    _arm_routers(model)
    batch = global_batch(model.config, 4, 16, 0)
    mine = local_batch(batch, mesh, rank)
    causal_lm_loss(model(mine.input_ids, mine.position_ids), mine.labels, batch.num_valid).backward()
    return {n: full_grad(p) for n, p in model.named_parameters()}


def _router_recompute(rank: int, world: int) -> dict[str, float]:
    reference = _rerouted_grads(rank, world, "off")
    out = {}
    for mode in ("router", "selective"):
        grads = _rerouted_grads(rank, world, mode)
        out[mode] = max(_relative(grads[n], g) for n, g in reference.items()
                        if float(g.abs().max()))
    return out


def _single_process_full_recompute_grads(mode: str) -> dict[str, Tensor]:
    torch.manual_seed(0)
    model = MoETransformer(get_preset("tiny-full"))
    if mode != "off":
        for module in list(model.modules()):
            if isinstance(module, (Block, MTPBlock)):
                install_checkpoint(module, mode)
    _arm_routers(model)
    ids, pos, labels = make_batch(model.config, 4, 16, seed=0)
    causal_lm_loss(model(ids, pos), labels, int((labels != -100).sum())).backward()
    return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def test_router_recompute_under_checkpointing_cannot_change_the_routing(
        ranks: Callable[[int], RankPool]) -> None:
    # the perturbation has teeth: plain full recompute does change the gradients
    off, full = (_single_process_full_recompute_grads(m) for m in ("off", "full"))
    assert max(_relative(full[n], g) for n, g in off.items()) > 0.1
    for result in ranks(WORLD).run(_router_recompute):
        assert result["router"] == 0.0 and result["selective"] == 0.0, result


# ---------------------------------------------------------------------------------------------
# 4. Routing weights receiving no gradient through the all-gather dispatcher
# ---------------------------------------------------------------------------------------------

ALL_GATHER = {
    "softmax": Case(mesh="dp_shard=4,ep=2", stages=(ep("all_gather"), FSDP32)),
    "sigmoid-bias": Case(mesh="dp_shard=4,ep=4", stages=(ep("all_gather"),), preset="tiny-full"),
}


def test_routing_weights_get_gradients_through_all_gather_dispatch(
        ranks: Callable[[int], RankPool]) -> None:
    results = ranks(WORLD).run(_parities, list(ALL_GATHER.values()))[0]
    for name, result in zip(ALL_GATHER, results, strict=True):
        routers = {n: e for n, e in result["grad_errors"].items() if n.endswith("router.weight")}
        assert routers, name
        assert not [n for n in result["zero_grads"] if n.endswith("router.weight")]
        # a detached routing weight leaves the router with only the (zero) grad: error 1.0
        assert max(routers.values()) <= 1e-5, (name, routers)
        assert_parity(result)


def _all_gather_weight_grad(rank: int, world: int) -> float:
    group = build_device_meshes(MeshSpec(dp_shard=world, ep=world), "cpu").group(("ep",))
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(3 + rank, H, generator=g)
    index = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(3 + rank)])
    w = (torch.rand(3 + rank, K, generator=g) + 0.1).requires_grad_()
    lo = rank * (E // world)
    gu = torch.randn(E // world, H, 2 * INTER, generator=torch.Generator().manual_seed(9 + lo))
    dn = torch.randn(E // world, INTER, H, generator=torch.Generator().manual_seed(19 + lo))
    AllGatherDispatch(E, group)(x, index, w, lambda xs, c: run_grouped_experts(xs, c, gu, dn)) \
        .sum().backward()
    assert w.grad is not None
    return float(w.grad.abs().min())


def test_every_routing_weight_slot_gets_a_nonzero_gradient(ranks: Callable[[int], RankPool]) -> None:
    assert all(smallest > 0 for smallest in ranks(WORLD).run(_all_gather_weight_grad))


# ---------------------------------------------------------------------------------------------
# 5. fp32 master weights silently becoming bf16
# ---------------------------------------------------------------------------------------------


def _bf16_training(rank: int, world: int) -> dict[str, Any]:
    case = Case(mesh="dp_shard=4,ep=2", stages=(ep(), ACOptions(), FSDPOptions(precision="bf16")),
                preset="tiny-full")
    reference, model, plan = build_pair(case)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batch = global_batch(reference.config, 4, 16, 0)
    mine = local_batch(batch, plan.mesh, rank)
    compute_dtypes = set()
    for _ in range(2):
        optimizer.zero_grad()
        outputs = model(mine.input_ids, mine.position_ids)
        compute_dtypes |= {str(o.dtype) for o in outputs}
        causal_lm_loss(outputs, mine.labels, batch.num_valid).backward()
        optimizer.step()
    return {
        "params": {str(p.dtype) for p in model.parameters()},
        "grads": {str(p.grad.dtype) for p in model.parameters() if p.grad is not None},
        "optimizer": {str(v.dtype) for state in optimizer.state.values() for k, v in state.items()
                      if k in ("exp_avg", "exp_avg_sq")},
        "state_dict": {str(v.dtype) for k, v in model.state_dict().items()
                       if not k.endswith(("tokens_per_expert", "expert_bias"))},
        "compute": compute_dtypes,
    }


def test_bf16_precision_keeps_fp32_master_weights_grads_and_optimizer_state(
        ranks: Callable[[int], RankPool]) -> None:
    for result in ranks(WORLD).run(_bf16_training):
        assert result["compute"] == {"torch.bfloat16"}, result  # bf16 really is in use
        for what in ("params", "grads", "optimizer", "state_dict"):
            assert result[what] == {"torch.float32"}, (what, result[what])


# ---------------------------------------------------------------------------------------------
# 6. Tied lm_head orphaned from its embedding
# ---------------------------------------------------------------------------------------------

TIED_STAGES: dict[str, Stages] = {
    "fsdp": (FSDP32,),
    "ep-ac-fsdp": (ep(), ACOptions(), FSDP32),
    "ep-no-fsdp": (ep(),),
}


def _tied_training(rank: int, world: int, stages: Stages) -> dict[str, Any]:
    case = Case(mesh="dp_shard=4,ep=2", stages=stages, preset="tiny-full")
    reference, model, plan = build_pair(case)
    case_start = reference.embed.weight.detach().clone()  # compare the updates, not the weights
    out: dict[str, Any] = {"after_realize": model.lm_head.weight is model.embed.weight}
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.25) for m in (model, reference)]
    batch = global_batch(reference.config, 4, 16, 0)
    mine = local_batch(batch, plan.mesh, rank)
    for _ in range(2):
        for opt in optimizers:
            opt.zero_grad()
        causal_lm_loss(model(mine.input_ids, mine.position_ids), mine.labels,
                       batch.num_valid).backward()
        causal_lm_loss(reference(batch.input_ids, batch.position_ids), batch.labels,
                       batch.num_valid).backward()
        for opt in optimizers:
            opt.step()
    out["after_step"] = model.lm_head.weight is model.embed.weight
    out["params_once"] = len(list(model.parameters())) == len(list(reference.parameters()))
    embed, head = _full(model.embed.weight.detach()), _full(model.lm_head.weight.detach())
    out["same_values"] = torch.equal(embed, head)
    out["vs_reference"] = _relative(embed - case_start, reference.embed.weight.detach() - case_start)
    return out


@pytest.mark.parametrize("stages", list(TIED_STAGES.values()), ids=list(TIED_STAGES))
def test_tied_lm_head_stays_tied_after_realize_and_optimizer_steps(
        ranks: Callable[[int], RankPool], stages: Stages) -> None:
    for result in ranks(WORLD).run(_tied_training, stages):
        assert result["after_realize"] and result["after_step"], result
        assert result["params_once"] and result["same_values"], result
        assert result["vs_reference"] <= 1e-4, result


# ---------------------------------------------------------------------------------------------
# 7. Checkpoint keys that change with the layout
# ---------------------------------------------------------------------------------------------

LAYOUTS: dict[str, tuple[str, Stages]] = {
    "fsdp": ("dp_shard=4", (FSDP32,)),
    "hsdp": ("dp_replicate=2,dp_shard=2", (FSDPOptions(precision="bf16"),)),
    "ep-alone": ("dp_shard=4,ep=2", (ep(),)),
    "ac-alone": ("dp_shard=4", (ACOptions(mode="selective"),)),
    "ep-ac-fsdp": ("dp_shard=4,ep=4", (ep("all_gather"), ACOptions(), FSDP32)),
    "cp-ep-ac-fsdp": ("dp_shard=2,cp=2,ep=2", (CPOptions(), ep(), ACOptions(), FSDP32)),
}


def _checkpoint_keys(rank: int, world: int, name: str) -> list[str]:
    mesh_text, stages = LAYOUTS[name]
    torch.manual_seed(0)
    plain = MoETransformer(get_preset("tiny-full"))
    model = copy.deepcopy(plain)
    mesh = MeshSpec.parse(mesh_text)
    planned = compose(*stages_from(stages))(model, mesh)
    realize(planned.unwrap(), model, build_device_meshes(mesh, "cpu"))
    want, got = plain.state_dict(), model.state_dict()
    found = sorted(set(want) ^ set(got))
    found += [f"param name {n}" for n in {n for n, _ in plain.named_parameters()}
              ^ {n for n, _ in model.named_parameters()}]
    # the same keys hold the same full values: a checkpoint moves between layouts
    found += [f"value {k}" for k in sorted(set(want) & set(got))
              if got[k].dtype != want[k].dtype or not torch.equal(_full(got[k]), want[k])]
    return found


def test_checkpoint_keys_and_values_do_not_depend_on_the_layout(
        ranks: Callable[[int], RankPool]) -> None:
    for name in LAYOUTS:  # one per call: see tests/ranks.py
        assert ranks(WORLD).run(_checkpoint_keys, name) == [[]] * WORLD, name


# ---------------------------------------------------------------------------------------------
# 8. (extra) Gradient accumulation syncing twice or dividing by the micro-batch count twice
# ---------------------------------------------------------------------------------------------


def _accumulated(rank: int, world: int, stages: Stages) -> float:
    case = Case(mesh="dp_shard=4,ep=2", stages=stages, preset="tiny-full")
    reference, model, plan = build_pair(case)
    batch = global_batch(reference.config, 8, 16, 0)
    halves = [Batch(input_ids=batch.input_ids[rows], position_ids=batch.position_ids[rows],
                    labels=batch.labels[rows]) for rows in (slice(0, 4), slice(4, 8))]
    for half in halves:  # loss of each micro-batch over the global token count: sums add up
        mine = local_batch(half, plan.mesh, rank)
        causal_lm_loss(model(mine.input_ids, mine.position_ids), mine.labels,
                       batch.num_valid).backward()
    causal_lm_loss(reference(batch.input_ids, batch.position_ids), batch.labels,
                   batch.num_valid).backward()
    ref_params = dict(reference.named_parameters())
    return max(_relative(full_grad(p), full_grad(ref_params[n])) for n, p in model.named_parameters())


@pytest.mark.parametrize("stages", [(ep(),), (ep(), FSDP32)], ids=["sync-hooks", "fsdp"])
def test_gradient_accumulation_over_micro_batches_is_exact(ranks: Callable[[int], RankPool],
                                                          stages: Stages) -> None:
    pool = ranks(WORLD)
    assert all(worst <= 1e-5 for worst in pool.run(_accumulated, stages))


def _view_warnings(rank: int, world: int) -> list[str]:
    import warnings

    _, model, _ = build_pair(Case(mesh="dp_shard=4,ep=2", stages=(
        EPOptions(dispatch="all_gather"), FSDPOptions(precision="fp32")),
        preset="tiny"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for seq in (8, 8 - 2 * rank):  # equal token counts, then uneven ones (padded gathers)
            ids = torch.randint(0, 64, (2, seq), generator=torch.Generator().manual_seed(rank))
            logits = model(ids, torch.arange(seq).expand(2, seq))
            causal_lm_loss(logits, next_token_labels(ids), 64).backward()
    return [str(w.message) for w in caught if "view" in str(w.message)]


def test_experts_units_do_not_return_views(ranks: Callable[[int], RankPool]) -> None:
    """FSDP2 warns that an in-place op on a view its unit returns drops the pre-backward hook
    (its all-gather in backward); the all-gather dispatcher returned a slice of its output."""
    assert ranks(WORLD).run(_view_warnings) == [[]] * WORLD
