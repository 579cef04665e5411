"""DCP checkpoints across layouts, meta-device materialisation and gradient accumulation.

Sources and targets start from different seeds, so a load that does nothing cannot pass; full
state dicts travel between processes as ``torch.save`` files next to the checkpoints.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from moefn import MeshSpec, compose
from moefn.adapters.reference import MoETransformer, Router, causal_lm_loss, get_preset
from moefn.plan.options import ACOptions, CPOptions, EPOptions, FSDPOptions
from moefn.realize import build_device_meshes, gloo_reduce_scatter, realize
from moefn.train.accumulate import no_gradient_sync
from moefn.train.dcp import (
    full_state_dict,
    load_checkpoint,
    materialize_from_checkpoint,
    save_checkpoint,
)
from moefn.train.loop import Batch, global_batch, local_batch, train_step
from tests.parity import Case, build_pair, full_grad
from tests.ranks import RankPool, release_groups

FSDP = FSDPOptions(precision="fp32")
EP = EPOptions(dispatch="all_to_all")
LAYOUTS: dict[str, tuple[str, Any]] = {
    "fsdp4": ("dp_shard=4", (FSDP,)),
    "fsdp2": ("dp_shard=2", (FSDP,)),
    "ep-fsdp": ("dp_shard=4,ep=2", (EP, FSDP)),
    "ep-fsdp2": ("dp_shard=2,ep=2", (EP, FSDP)),
    "hsdp": ("dp_replicate=2,dp_shard=2", (FSDP,)),
    "ep-alone": ("dp_shard=4,ep=2", (EP,)),
    "cp-ep-ac-fsdp": ("dp_shard=2,cp=2,ep=2", (CPOptions(), EP, ACOptions(mode="router"),
                                               FSDP)),
}
TINY_KEYS = set(MoETransformer(get_preset("tiny")).state_dict())


def realized(layout: str, seed: int, preset: str = "tiny") -> nn.Module:
    mesh, stages = LAYOUTS[layout]
    return build_pair(Case(mesh=mesh, stages=stages, seed=seed, preset=preset))[1]


def plain(seed: int, preset: str = "tiny") -> MoETransformer:
    torch.manual_seed(seed)
    return MoETransformer(get_preset(preset))


def differences(got: dict[str, Tensor], want: dict[str, Tensor]) -> list[str]:
    """Keys that are missing, extra or not bit-identical."""
    if set(got) != set(want):
        return sorted(set(got) ^ set(want))
    return [key for key in want if not torch.equal(got[key], want[key])]


def save_with_full(root: str, name: str, model: nn.Module,
                   optimizer: torch.optim.Optimizer | None = None) -> None:
    """The checkpoint ``root/name`` and its full state dict ``root/name.pt`` (written once)."""
    save_checkpoint(os.path.join(root, name), model, optimizer)
    full = full_state_dict(model)
    if not dist.is_initialized() or dist.get_rank() == 0:
        torch.save(full, os.path.join(root, name + ".pt"))


def expected(root: str, name: str) -> dict[str, Tensor]:
    full: dict[str, Tensor] = torch.load(os.path.join(root, name + ".pt"))
    return full


# --- round trips ----------------------------------------------------------------------------

def _save_on_four(rank: int, world: int, root: str, name: str, seed: int) -> None:
    model = realized(name, seed)
    assert set(full_state_dict(model)) == TINY_KEYS, name
    save_with_full(root, name, model)


def _load_on(rank: int, world: int, root: str, source: str, target: str) -> list[str]:
    model = realized(target, seed=0)
    load_checkpoint(os.path.join(root, source), model, None)
    return differences(full_state_dict(model), expected(root, source))


def _load_on_two(rank: int, world: int, root: str) -> dict[str, list[str]]:
    found = {}
    for source, target in (("fsdp4", "fsdp2"), ("ep-fsdp", "ep-fsdp2"), ("cp-ep-ac-fsdp", "fsdp2")):
        model = realized(target, seed=0)
        load_checkpoint(os.path.join(root, source), model, None)
        found[f"{source}->{target}"] = differences(full_state_dict(model), expected(root, source))
    if rank == 0:  # a plain model in a process with a default process group: no other rank
        model = plain(seed=0)
        load_checkpoint(os.path.join(root, "hsdp"), model, None)
        found["hsdp->plain-in-group"] = differences(full_state_dict(model),
                                                    expected(root, "hsdp"))
    return found


def test_checkpoints_round_trip_bit_exactly_across_layouts(
        ranks: Callable[[int], RankPool], tmp_path: Any) -> None:
    root = str(tmp_path)
    save_with_full(root, "plain", plain(seed=5))  # this process has no process group
    for seed, name in enumerate(("fsdp4", "ep-fsdp", "hsdp", "ep-alone", "cp-ep-ac-fsdp"), 1):
        ranks(4).run(_save_on_four, root, name, seed)  # a layout per call: see tests/ranks.py
    found = [{f"{source}->{target}": diff}
             for source, target in (("plain", "ep-fsdp"), ("hsdp", "fsdp4"),
                                    ("ep-alone", "ep-fsdp"), ("ep-fsdp", "ep-alone"))
             for diff in ranks(4).run(_load_on, root, source, target)]
    found += ranks(2).run(_load_on_two, root)
    model = plain(seed=0)
    load_checkpoint(os.path.join(root, "ep-fsdp"), model, None)
    found.append({"ep-fsdp->plain": differences(full_state_dict(model),
                                                expected(root, "ep-fsdp"))})
    assert set(expected(root, "ep-fsdp")) == TINY_KEYS
    assert all(differences(expected(root, a), expected(root, b))
               for a, b in (("plain", "hsdp"), ("hsdp", "ep-fsdp")))  # the seeds matter
    pairs = [pair for per_rank in found for pair in per_rank.items()]
    assert len(pairs) == 4 * 4 + 2 * 3 + 1 + 1
    assert not [pair for pair in pairs if pair[1]], pairs


# --- optimizer state -------------------------------------------------------------------------

STEPS, LR, MOMENTUM = 2, 0.25, 0.9


def sgd(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)


def batch_of(layout: str | None, rank: int) -> tuple[Batch, int]:
    batch = global_batch(get_preset("tiny"), batch=4, seq=16, seed=0)
    mine = batch if layout is None else local_batch(batch, MeshSpec.parse(LAYOUTS[layout][0]),
                                                    rank)
    return mine, batch.num_valid


def _train_save_or_resume(rank: int, world: int, root: str, layout: str, source: str | None,
                          save_as: str | None) -> list[float]:
    """Train ``STEPS`` steps under ``layout`` from seed 0 (or resumed from ``source``)."""
    model = realized(layout, seed=9 if source else 0)
    optimizer = sgd(model)
    if source:
        load_checkpoint(os.path.join(root, source), model, optimizer)
    mine, num_valid = batch_of(layout, rank)
    losses = [train_step(model, optimizer, mine, num_valid) for _ in range(STEPS)]
    if save_as:
        save_checkpoint(os.path.join(root, save_as), model, optimizer)
    return losses


def test_training_resumes_across_layouts_with_optimizer_state(
        ranks: Callable[[int], RankPool], tmp_path: Any) -> None:
    root = str(tmp_path)
    batch, num_valid = batch_of(None, 0)
    model = plain(seed=0)
    optimizer = sgd(model)
    reference = [train_step(model, optimizer, batch, num_valid) for _ in range(3 * STEPS)]
    model = plain(seed=0)
    optimizer = sgd(model)
    first = [train_step(model, optimizer, batch, num_valid) for _ in range(STEPS)]
    save_checkpoint(os.path.join(root, "plain"), model, optimizer)
    four, two = ranks(4), ranks(2)
    runs = {  # each chain of 2-step legs continues the one before it
        "ep-fsdp": four.run(_train_save_or_resume, root, "ep-fsdp", None, "ep-fsdp")[0],
        "plain->ep-fsdp": first + four.run(_train_save_or_resume, root, "ep-fsdp", "plain",
                                           None)[0],
    }
    runs["ep-fsdp->hsdp"] = runs["ep-fsdp"] + four.run(
        _train_save_or_resume, root, "hsdp", "ep-fsdp", "hsdp")[0]
    runs["..hsdp->fsdp2"] = runs["ep-fsdp->hsdp"] + two.run(
        _train_save_or_resume, root, "fsdp2", "hsdp", None)[0]
    model = plain(seed=3)
    optimizer = sgd(model)
    load_checkpoint(os.path.join(root, "hsdp"), model, optimizer)
    runs["..hsdp->plain"] = runs["ep-fsdp->hsdp"] + [
        train_step(model, optimizer, batch, num_valid) for _ in range(STEPS)]
    assert reference[0] - reference[-1] > 0.1  # it trains
    for name, losses in runs.items():
        target = reference[:len(losses)]
        assert max(abs(a - b) for a, b in zip(losses, target, strict=True)) <= 1e-6, (
            name, losses, target)


# --- meta-device materialisation -------------------------------------------------------------

def _materialize(rank: int, world: int, root: str) -> dict[str, Any]:
    mesh, stages = LAYOUTS["ep-fsdp"]
    case = Case(mesh=mesh, stages=stages, preset="tiny-full")
    source = realized("ep-fsdp", seed=7, preset="tiny-full")
    generator = torch.Generator().manual_seed(1)
    routers = [m for m in source.modules() if isinstance(m, Router)]
    for router in routers:  # persistent buffers travel too
        assert router.expert_bias is not None
        router.expert_bias.copy_(torch.randn(router.expert_bias.shape, generator=generator))
    path = os.path.join(root, "tiny-full")
    save_checkpoint(path, source, None)
    source_state = full_state_dict(source)
    del source, routers, router
    release_groups()  # three realized models' groups at once would hold ~100 gloo threads
    with torch.device("meta"):
        lazy = MoETransformer(get_preset("tiny-full"))
    spec = MeshSpec.parse(mesh)
    realize(compose(*case.build_stages())(lazy, spec).unwrap(), lazy,
            build_device_meshes(spec, "cpu"))
    materialize_from_checkpoint(path, lazy, "cpu")
    eager = realized("ep-fsdp", seed=0, preset="tiny-full")
    load_checkpoint(path, eager, None)
    local = sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel()
                for p in lazy.parameters())
    counters = [m.tokens_per_expert for m in lazy.modules() if isinstance(m, Router)]
    zeroed = all(not c.any() for c in counters)
    batch = local_batch(global_batch(get_preset("tiny-full"), 4, 16, 0), spec, rank)
    losses, grads = [], []
    for model in (lazy, eager):  # FSDP's lazy init after to_empty: forward and backward work
        loss = causal_lm_loss(model(batch.input_ids, batch.position_ids), batch.labels, 100)
        loss.backward()  # type: ignore[no-untyped-call]
        losses.append(float(loss))
        grads.append({n: full_grad(p) for n, p in model.named_parameters()})
    eager_counters = [m.tokens_per_expert for m in eager.modules() if isinstance(m, Router)]
    return {
        "vs_eager": differences(full_state_dict(lazy), full_state_dict(eager)),
        "vs_source": differences(full_state_dict(lazy), source_state),
        "keys": set(full_state_dict(lazy)) == set(plain(0, "tiny-full").state_dict()),
        "local_fraction": local / sum(p.numel() for p in plain(0, "tiny-full").parameters()),
        "zeroed": zeroed,
        "same_counts": all(torch.equal(a, b)
                           for a, b in zip(counters, eager_counters, strict=True)),
        "same_loss": losses[0] == losses[1],
        "same_grads": differences(grads[0], grads[1]),
        "tied": lazy.lm_head.weight is lazy.embed.weight,
    }


def test_a_meta_realized_model_materializes_from_a_checkpoint(
        ranks: Callable[[int], RankPool], tmp_path: Any) -> None:
    for result in ranks(4).run(_materialize, str(tmp_path)):
        assert result["vs_eager"] == [] and result["vs_source"] == [], result
        assert result["keys"] and result["zeroed"] and result["tied"], result
        assert result["local_fraction"] < 0.5, result  # no rank holds the full model
        assert result["same_counts"] and result["same_loss"] and result["same_grads"] == [], result


# --- gradient accumulation -------------------------------------------------------------------

# torch.distributed's reductions, and the reduce-scatter FSDP runs on gloo (an all-to-all and a sum)
REDUCTIONS = ((dist, "all_reduce"), (dist, "reduce_scatter_tensor"),
              (dist, "reduce_scatter_single"), (gloo_reduce_scatter, "reduce_scatter_by_all_to_all"))


def count_reductions(run: Callable[[], None]) -> int:
    """How many reducing collectives ``run`` issues (each of `REDUCTIONS` patched meanwhile)."""
    calls = []
    originals = {(module, name): getattr(module, name) for module, name in REDUCTIONS}

    def counting(original: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            calls.append(original)
            return original(*args, **kwargs)
        return call

    try:
        for (module, name), original in originals.items():
            setattr(module, name, counting(original))
        run()
    finally:
        for (module, name), original in originals.items():
            setattr(module, name, original)
    return len(calls)


def _accumulate(rank: int, world: int, layout: str) -> dict[str, Any]:
    """Two micro-batches (the first without sync) against one process on both together."""
    reference, model = plain(seed=0), realized(layout, seed=0)
    big = global_batch(reference.config, batch=8, seq=16, seed=1)
    total = big.num_valid
    halves = [Batch(input_ids=t[0], position_ids=t[1], labels=t[2]) for t in zip(
        big.input_ids.chunk(2), big.position_ids.chunk(2), big.labels.chunk(2), strict=True)]
    loss = causal_lm_loss(reference(big.input_ids, big.position_ids), big.labels, total)
    loss.backward()  # type: ignore[no-untyped-call]
    spec = MeshSpec.parse(LAYOUTS[layout][0])

    def backward(half: Batch) -> None:
        mine = local_batch(half, spec, rank)
        loss = causal_lm_loss(model(mine.input_ids, mine.position_ids), mine.labels, total)
        loss.backward()  # type: ignore[no-untyped-call]

    with no_gradient_sync(model):
        unsynced = count_reductions(lambda: backward(halves[0]))
    no_sharded_grads = all(p.grad is None for p in model.parameters())
    synced = count_reductions(lambda: backward(halves[1]))
    wanted = dict(reference.named_parameters())
    errors, zero = {}, []
    for name, param in model.named_parameters():
        got, want = full_grad(param), full_grad(wanted[name])
        scale = float(want.abs().max())
        zero += [name] if scale == 0.0 else []
        errors[name] = float((got - want).abs().max()) / max(scale, 1e-30)
    return {"unsynced": unsynced, "synced": synced, "no_sharded_grads": no_sharded_grads,
            "worst": max(errors.items(), key=lambda kv: kv[1]), "zero": zero}


@pytest.mark.parametrize("layout", ["fsdp4", "ep-fsdp", "ep-alone"])
def test_gradient_accumulation_without_sync_matches_one_process(
        ranks: Callable[[int], RankPool], layout: str) -> None:
    for result in ranks(4).run(_accumulate, layout):
        assert result["worst"][1] <= 1e-5 and not result["zero"], result
        assert result["synced"] > 0, result  # the counter sees the reductions
        if layout != "ep-alone":  # FSDP: no reduce-scatter, so no sharded gradient yet
            assert result["unsynced"] == 0 and result["no_sharded_grads"], result


def test_no_gradient_sync_skips_the_all_reduce_hooks_of_models_without_fsdp(
        ranks: Callable[[int], RankPool]) -> None:
    for result in ranks(4).run(_accumulate, "ep-alone"):
        assert result["unsynced"] == 0, result
