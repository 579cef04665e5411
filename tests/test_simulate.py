"""Fake-world validation: realize for representative ranks of 1024/4096-rank worlds."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from moefn.adapters.transformers.presets import HF_PRESETS
from moefn.cli import main
from moefn.plan.mesh import MeshSpec
from moefn.realize.simulate import representative_ranks


def _simulate(model: str, mesh: str, *flags: str) -> dict[str, object]:
    out = subprocess.run([sys.executable, "-m", "moefn", "plan", "--model", model, "--mesh", mesh,
                          "--json", *(flags or ("--simulate",))], capture_output=True, text=True,
                         timeout=1800)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    doc: dict[str, object] = json.loads(out.stdout)
    return doc


SLOW = pytest.mark.slow  # minutes each: `nox -s tests_slow`


@pytest.mark.parametrize(("model", "mesh"), [
    pytest.param("deepseek-v3", "dp_shard=1024,ep=64", marks=SLOW),
    pytest.param("qwen3-30b-a3b", "dp_shard=1024,ep=64", marks=SLOW),
    pytest.param("deepseek-v3", "dp_shard=4096,ep=64", marks=SLOW),  # MLA: 150 s
    pytest.param("qwen3-30b-a3b", "dp_shard=4096,ep=64", marks=SLOW),  # 3 ranks: ~80 s
])
@pytest.mark.timeout(900)  # a 4096-rank world takes ~2 minutes on a quiet 2-core machine
def test_simulated_ranks_hold_what_the_plan_says(model: str, mesh: str) -> None:
    doc = _simulate(model, mesh)
    simulated = doc["simulated"]
    assert isinstance(simulated, list)
    spec = MeshSpec.parse(mesh)
    assert [s["rank"] for s in simulated] == list(representative_ranks(spec))
    assert all(s["ranks_checked"] == spec.world_size for s in simulated)  # every rank, by torch


@pytest.mark.timeout(600)
@pytest.mark.parametrize("layers", [pytest.param(2), pytest.param(48, marks=SLOW)])
def test_one_chosen_rank_of_4096_checks_every_rank(layers: int, tmp_path: Path) -> None:
    """The default run's 4096-rank case: Qwen3-30B-A3B's transformers layers at 4096 ranks with
    2 of its 48 layers (~15 s; all 48 take ~45 s, in the slow run: torch's fully_shard pads each
    parameter's 4096 chunks one tensor at a time). One realized rank checks the shards of all."""
    model_type, fields = HF_PRESETS["hf-qwen3-30b-a3b"]
    config = tmp_path / "config.json"
    config.write_text(json.dumps(dict(fields, model_type=model_type, num_hidden_layers=layers)))
    out = subprocess.run([sys.executable, "-m", "moefn", "plan", "--hf-config", str(config),
                          "--mesh", "dp_shard=4096,ep=64", "--json", "--simulate-ranks", "4095"],
                         capture_output=True, text=True, timeout=1800)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    doc = json.loads(out.stdout)
    assert doc["problems"] == []
    assert [(s["rank"], s["ranks_checked"]) for s in doc["simulated"]] == [(4095, 4096)]


@pytest.mark.parametrize(("ranks", "code", "words"), [
    ("0,x", 2, "expected ranks such as 0,4095"),
    ("-1", 2, "expected ranks such as 0,4095"),
    ("8", 1, "use ranks in 0..3"),
])
def test_bad_simulate_ranks_are_refused(ranks: str, code: int, words: str,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["plan", "--model", "tiny", "--mesh", "dp_shard=4,ep=2", "--simulate-ranks", ranks]
    try:
        returned = main(argv)
    except SystemExit as exit_:  # argparse refuses the spelling
        returned = exit_.code
    said = capsys.readouterr()
    assert returned == code and words in said.out + said.err, said


def test_a_layout_disagreement_fails_loudly(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from moefn import PlanError, compose, plan_ep, plan_fsdp
    from moefn.adapters.reference import MoETransformer, get_preset
    from moefn.realize import simulate as sim

    with torch.device("meta"):
        model = MoETransformer(get_preset("tiny"))
    plan = compose(plan_ep(), plan_fsdp())(model, MeshSpec(dp_shard=8, ep=2)).unwrap()
    assert [r.ranks_checked for r in sim.simulate(
        plan, lambda: MoETransformer(get_preset("tiny")))] == [8, 8, 8]
    monkeypatch.setattr(sim, "local_shape", lambda layout, mesh, rank: layout.shape)
    with pytest.raises(PlanError, match="local shape differs"):
        sim.simulate(plan, lambda: MoETransformer(get_preset("tiny")), ranks=[5])


def test_ranks_that_are_not_realized_are_checked_too(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from moefn import PlanError, compose, plan_ep, plan_fsdp
    from moefn.adapters.reference import MoETransformer, get_preset
    from moefn.analyse.layout import local_shape_and_offset
    from moefn.realize import simulate as sim

    with torch.device("meta"):
        model = MoETransformer(get_preset("tiny"))
    plan = compose(plan_ep(), plan_fsdp())(model, MeshSpec(dp_shard=8, ep=2)).unwrap()

    def wrong_on_rank_6(layout, mesh, rank):  # type: ignore[no-untyped-def]
        shape, offset = local_shape_and_offset(layout, mesh, rank)
        return shape, tuple(o + (rank == 6) for o in offset)

    monkeypatch.setattr(sim, "local_shape_and_offset", wrong_on_rank_6)
    with pytest.raises(PlanError, match="rank 6: torch places the shard elsewhere"):
        sim.simulate(plan, lambda: MoETransformer(get_preset("tiny")), ranks=[0])


def test_experts_with_an_uneven_dim_1_shard_on_dim_0() -> None:
    """1 local expert over ep_shard=3 ranks: dim 1 (hidden 32) does not divide by 3, and FSDP2
    shards dims > 0 only evenly — the plan shards dim 0; a plan that insists is refused typed."""
    import torch
    from attrs import evolve

    from moefn import RealizeError, compose, plan_ep, plan_fsdp
    from moefn.adapters.reference import MoETransformer, get_preset
    from moefn.plan.records import FullyShard
    from moefn.realize import simulate as sim

    with torch.device("meta"):
        model = MoETransformer(get_preset("tiny-2experts"))
    plan = compose(plan_ep(), plan_fsdp())(model, MeshSpec(dp_shard=6, ep=2)).unwrap()
    experts = [u for u in plan.steps_of(FullyShard) if u.path.endswith("experts")]
    assert experts and all(u.shard_dim == 0 for u in experts)
    assert len(sim.simulate(plan, lambda: MoETransformer(get_preset("tiny-2experts")))) == 3
    forced = evolve(plan, steps=tuple(evolve(s, shard_dim=1) if s in experts else s
                                      for s in plan.steps))
    with pytest.raises(RealizeError, match="FSDP2 shards dim 1 only evenly"):
        sim.simulate(forced, lambda: MoETransformer(get_preset("tiny-2experts")), ranks=[0])
