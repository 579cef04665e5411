"""Fake-world validation: realize for representative ranks of 1024/4096-rank worlds."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from moefn.mesh import MeshSpec
from moefn.simulate import representative_ranks


def _simulate(model: str, mesh: str) -> dict[str, object]:
    out = subprocess.run([sys.executable, "-m", "moefn", "plan", "--model", model, "--mesh", mesh,
                          "--simulate", "--json"], capture_output=True, text=True, timeout=1800)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    doc: dict[str, object] = json.loads(out.stdout)
    return doc


@pytest.mark.parametrize(("model", "mesh"), [
    ("deepseek-v3", "dp_shard=1024,ep=64"),
    ("qwen3-30b-a3b", "dp_shard=1024,ep=64"),
    ("deepseek-v3", "dp_shard=4096,ep=64"),
    ("qwen3-30b-a3b", "dp_shard=4096,ep=64"),
])
def test_simulated_ranks_hold_what_the_plan_says(model: str, mesh: str) -> None:
    doc = _simulate(model, mesh)
    simulated = doc["simulated"]
    assert isinstance(simulated, list)
    assert [s["rank"] for s in simulated] == list(representative_ranks(MeshSpec.parse(mesh)))


def test_a_layout_disagreement_fails_loudly(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from moefn import PlanError, compose, plan_ep, plan_fsdp
    from moefn import simulate as sim
    from moefn.models import MoETransformer, get_preset

    with torch.device("meta"):
        model = MoETransformer(get_preset("tiny"))
    plan = compose(plan_ep(), plan_fsdp())(model, MeshSpec(dp_shard=8, ep=2)).unwrap()
    assert len(sim.simulate(plan, lambda: MoETransformer(get_preset("tiny")))) == 3
    monkeypatch.setattr(sim, "local_shape", lambda layout, mesh, rank: layout.shape)
    with pytest.raises(PlanError, match="local shape differs"):
        sim.simulate(plan, lambda: MoETransformer(get_preset("tiny")), ranks=[5])
