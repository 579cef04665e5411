"""The estimate equals what a realized model allocates, rank by rank (real gloo ranks)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
from torch.distributed.tensor import DTensor

from moefn import MeshSpec
from moefn.adapters.reference import causal_lm_loss
from moefn.analyse.estimate import estimate, estimate_memory
from moefn.plan.options import CPOptions, EPOptions, FSDPOptions
from moefn.train.loop import global_batch, local_batch
from tests.parity import Case, build_pair
from tests.ranks import RankPool
from tests.test_plan import meta_model

FSDP = FSDPOptions(precision="fp32")


def _allocated_bytes(tensors: Any) -> int:
    """Bytes of the distinct storages behind ``tensors`` (FSDP2 shards sit in padded storages;
    a unit's gradients are views of one reduce-scatter output)."""
    storages = {}
    for t in tensors:
        storage = (t.to_local() if isinstance(t, DTensor) else t).untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def _measure(rank: int, world: int, case: Case) -> dict[str, int]:
    reference, model, plan = build_pair(case)
    batch = global_batch(reference.config, 12, 16, 0)
    mine = local_batch(batch, plan.mesh, rank)
    causal_lm_loss(model(mine.input_ids, mine.position_ids), mine.labels,
                   batch.num_valid).backward()
    predicted = estimate_memory(plan, rank, optimizer="sgd")
    return {"params": _allocated_bytes(model.parameters()),
            "grads": _allocated_bytes(p.grad for p in model.parameters() if p.grad is not None),
            "predicted_params": sum(v for _, v in predicted.params),
            "predicted_grads": sum(v for _, v in predicted.grads)}


@pytest.mark.parametrize(("mesh", "stages", "preset"), [
    ("dp_shard=4", (FSDP,), "tiny-full"),
    ("dp_shard=4,ep=2", (EPOptions(dispatch="all_to_all"), FSDP), "tiny"),
    ("dp_shard=4,ep=2", (EPOptions(dispatch="all_to_all"), FSDP), "tiny-2experts"),
    ("dp_shard=2,cp=2,ep=4", (CPOptions(), EPOptions(dispatch="all_gather"), FSDP), "tiny"),
    ("dp_shard=2,ep=2", (EPOptions(dispatch="all_to_all"), FSDP), "tiny-full"),
    ("dp_shard=3", (FSDP,), "tiny-full"),  # 64 vocab rows, 32-wide norms over 3: padded shards
    ("dp_replicate=2,dp_shard=2,ep=2", (EPOptions(dispatch="all_gather"), FSDP), "tiny"),
])
def test_memory_estimate_is_exact_on_every_rank(ranks: Callable[[int], RankPool], mesh: str,
                                                stages: Any, preset: str) -> None:
    world = MeshSpec.parse(mesh).world_size
    for rank, m in enumerate(ranks(world).run(_measure, Case(mesh=mesh, stages=stages,
                                                              preset=preset))):
        assert m["params"] == m["predicted_params"], (rank, m)
        assert m["grads"] == m["predicted_grads"], (rank, m)


def _measure_adamw(rank: int, world: int, master: str) -> dict[str, int]:
    """Bytes a realized rank allocates after one AdamW step, masters kept in ``master`` and
    FSDP computing in bf16 (what ``moefn plan --master-dtype ... --precision bf16`` describes)."""
    import torch

    from moefn import compose, plan_fsdp
    from moefn.adapters.reference import MoETransformer, get_preset
    from moefn.realize import build_device_meshes, realize

    torch.manual_seed(0)
    model = MoETransformer(get_preset("tiny")).to(getattr(torch, master))
    mesh = MeshSpec(dp_shard=world)
    plan = compose(plan_fsdp(precision="bf16"))(model, mesh).unwrap()
    realize(plan, model, build_device_meshes(mesh, "cpu"))
    batch = global_batch(model.config, 4, 16, 0)
    mine = local_batch(batch, mesh, rank)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    causal_lm_loss(model(mine.input_ids, mine.position_ids), mine.labels,
                   batch.num_valid).backward()
    optimizer.step()
    return {"params": _allocated_bytes(model.parameters()),
            "grads": _allocated_bytes(p.grad for p in model.parameters() if p.grad is not None),
            "optimizer": _allocated_bytes(v for state in optimizer.state.values()
                                          for k, v in state.items() if k != "step")}


@pytest.mark.parametrize(("master", "dtype"), [("fp32", "float32"), ("bf16", "bfloat16")])
def test_master_dtype_estimate_is_what_a_rank_allocates(
        ranks: Callable[[int], RankPool], capsys: pytest.CaptureFixture[str], master: str,
        dtype: str) -> None:
    """fp32 masters with bf16 compute: 16 bytes per parameter with AdamW, not the 8 of bf16."""
    from moefn.cli import main

    assert main(["plan", "--model", "tiny", "--mesh", "dp_shard=2", "--precision", "bf16",
                 "--master-dtype", master, "--json"]) == 0
    memory = json.loads(capsys.readouterr().out)["memory"]
    assert set(memory["dtypes"].values()) == {dtype}
    measured = ranks(2).run(_measure_adamw, dtype)[0]
    assert measured == {part: sum(memory[part].values())
                        for part in ("params", "grads", "optimizer")}


def test_estimate_at_scale_is_symbolic() -> None:
    from moefn import compose, plan_ep, plan_fsdp

    plan = compose(plan_ep(), plan_fsdp())(meta_model("deepseek-v3"),
                                           MeshSpec(dp_shard=4096, ep=64)).unwrap()
    first, last = estimate(plan, rank=0), estimate(plan, rank=4095)
    experts = dict(first.memory.params)["experts"]
    # 256 experts / 64 = 4 per rank, dim 1 over ep_shard = 64: every rank holds the same share
    assert experts == dict(last.memory.params)["experts"] > 0
    assert {(c.collective, c.axes) for c in first.comm} == {
        ("fsdp all-gather", ("dp_shard_cp",)), ("fsdp reduce-scatter", ("dp_shard_cp",)),
        ("fsdp all-gather", ("ep_shard",)), ("fsdp reduce-scatter", ("ep_shard",)),
        ("ep routing counts", ("ep",)), ("ep dispatch + combine", ("ep",))}
    assert first.comm == last.comm  # FSDP pads shards and routing is uniform: every rank alike
    assert all(c.received >= c.lower_bound > 0 for c in first.comm
               if c.collective != "ep routing counts")
