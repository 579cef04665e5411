"""Context parallelism on real gloo ranks: parity with one process, alone and composed."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from moefn import MeshSpec, compose, plan_cp, plan_fsdp
from moefn.adapters.reference import MoETransformer, get_preset
from moefn.analyse.render import diff
from moefn.plan.options import ACOptions, CPOptions, EPOptions, FSDPOptions
from moefn.realize import build_device_meshes, realize
from moefn.realize.context_parallel import shard_sequence, unshard_sequence
from moefn.train.loop import global_batch, local_batch
from tests.parity import Case, assert_parity, run_parity
from tests.ranks import RankPool

CP = CPOptions()
FSDP = FSDPOptions(precision="fp32")
CASES = [
    # id, mesh, stages, preset
    ("cp2-alone-gqa", "dp_shard=2,cp=2", (CP,), "tiny"),
    ("cp4-alone-gqa", "cp=4", (CP,), "tiny"),
    ("cp2-replicated-alone", "dp_replicate=2,cp=2", (CP,), "tiny"),
    ("cp2-fsdp-bidirectional", "dp_shard=2,cp=2", (CP, FSDP), "tiny-bidirectional"),
    ("cp4-fsdp", "cp=4", (CP, FSDP), "tiny"),
    ("cp2-ep2-ac-fsdp", "dp_shard=2,cp=2,ep=2",
     (CP, EPOptions(dispatch="all_to_all"), ACOptions(mode="router"), FSDP), "tiny-full"),
    ("cp2-ep2-ag-selective-fsdp", "dp_shard=2,cp=2,ep=2",
     (CP, EPOptions(dispatch="all_gather"), ACOptions(mode="selective"), FSDP),
     "tiny-full"),
    ("cp2-ep2-ac-fsdp-mla", "dp_shard=2,cp=2,ep=2",
     (CP, EPOptions(dispatch="all_to_all"), ACOptions(mode="router"), FSDP), "tiny-mla"),
]


@pytest.mark.parametrize(("mesh", "stages", "preset"), [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_cp_matches_one_process(ranks: Callable[[int], RankPool], mesh: str, stages: Any,
                                preset: str) -> None:
    assert_parity(ranks(4).run(run_parity, Case(mesh=mesh, stages=stages, preset=preset))[0])


def _forward_outputs(rank: int, world: int, preset: str) -> dict[str, Any]:
    torch.manual_seed(0)
    reference = MoETransformer(get_preset(preset))
    torch.manual_seed(0)
    model = MoETransformer(get_preset(preset))
    mesh = MeshSpec(cp=world)
    plan = compose(plan_cp(seq_len=16), plan_fsdp(precision="fp32"))(model, mesh).unwrap()
    realize(plan, model, build_device_meshes(mesh, "cpu"))
    batch = global_batch(reference.config, 2, 16, 0)
    mine = local_batch(batch, mesh, rank)
    with torch.no_grad():
        local = model(mine.input_ids, mine.position_ids)[0]
        full = reference(batch.input_ids, batch.position_ids)[0]
    shards = [torch.empty_like(local) for _ in range(world)]
    torch.distributed.all_gather(shards, local.contiguous())
    restored = unshard_sequence(shards)
    return {"error": float((restored - full).abs().max() / full.abs().max())}


@pytest.mark.parametrize("preset", ["tiny", "tiny-bidirectional"])
def test_cp_forward_restores_the_full_sequence_logits(ranks: Callable[[int], RankPool],
                                                      preset: str) -> None:
    for result in ranks(4).run(_forward_outputs, preset):
        assert result["error"] <= 1e-5


def test_head_tail_layout_round_trips() -> None:
    t = torch.arange(2 * 16).view(2, 16)
    for cp in (1, 2, 4):
        assert torch.equal(unshard_sequence([shard_sequence(t, cp, r) for r in range(cp)]), t)
    assert shard_sequence(t, 2, 0)[0].tolist() == [0, 1, 2, 3, 12, 13, 14, 15]
    with pytest.raises(ValueError, match="use 8 or 16"):
        shard_sequence(torch.zeros(1, 14), 4, 0)


def test_cp_plan_targets_every_core_attention_and_refuses_missing_attention() -> None:
    from tests.test_plan import meta_model

    plan = compose(plan_cp(seq_len=32))(meta_model(), MeshSpec(dp_shard=2, cp=2)).unwrap()
    assert [s.path for s in plan.steps] == ["layers.0.attn.core", "layers.1.attn.core", ""]
    assert "all-gather K/V over cp(2), head_tail layout, seq_len 32" in diff(plan)
    result = compose(plan_cp())(torch.nn.Sequential(), MeshSpec(cp=2))
    assert "unrecognised model architecture" in str(result.failure())
