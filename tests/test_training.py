"""Training helpers across meshes: the global-norm clip and the expert-bias update."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from moefn.adapters.reference import Router, causal_lm_loss
from moefn.plan.options import EPOptions, FSDPOptions
from moefn.train.clip import clip_grad_norm
from moefn.train.loop import global_batch, local_batch
from moefn.train.routing import update_expert_bias
from tests.parity import Case, build_pair, full_grad
from tests.ranks import RankPool


def _clip_and_bias(rank: int, world: int, dispatch: str) -> dict[str, Any]:
    case = Case(mesh="dp_shard=4,ep=2", preset="tiny-full",
                stages=(EPOptions(dispatch=dispatch), FSDPOptions(precision="fp32")))
    reference, model, plan = build_pair(case)
    batch = global_batch(reference.config, 4, 16, 0)
    mine = local_batch(batch, plan.mesh, rank)
    causal_lm_loss(model(mine.input_ids, mine.position_ids), mine.labels,
                   batch.num_valid).backward()
    causal_lm_loss(reference(batch.input_ids, batch.position_ids), batch.labels,
                   batch.num_valid).backward()
    norm = clip_grad_norm(model.parameters(), max_norm=0.05)
    ref_norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), max_norm=0.05)
    ref_params = dict(reference.named_parameters())
    grad_error = max(float((full_grad(p) - full_grad(ref_params[n])).abs().max()
                           / full_grad(ref_params[n]).abs().max())
                     for n, p in model.named_parameters())
    update_expert_bias(model, rate=0.01)
    update_expert_bias(reference, rate=0.01, distributed=False)
    biases = {n: b for n, b in model.named_buffers() if n.endswith("expert_bias")}
    ref_biases = {n: b for n, b in reference.named_buffers() if n.endswith("expert_bias")}
    return {"norm": float(norm), "ref_norm": float(ref_norm), "grad_error": grad_error,
            "bias_equal": all(torch.equal(biases[n], ref_biases[n]) for n in ref_biases),
            "bias_moved": all(bool(b.abs().sum() > 0) for b in ref_biases.values()),
            "biases": {n: b.clone() for n, b in biases.items()},
            "counts_reset": all(float(m.tokens_per_expert.sum()) == 0 for m in model.modules()
                                if isinstance(m, Router))}


@pytest.mark.parametrize("dispatch", ["all_to_all", "all_gather"])
def test_clip_uses_the_true_global_norm_and_biases_stay_in_sync(
        ranks: Callable[[int], RankPool], dispatch: str) -> None:
    results = ranks(4).run(_clip_and_bias, dispatch)
    first = results[0]
    assert first["ref_norm"] > 0.05  # the clip really scales
    assert abs(first["norm"] - first["ref_norm"]) <= 1e-5 * first["ref_norm"]
    assert first["grad_error"] <= 1e-5
    assert first["bias_equal"] and first["bias_moved"] and first["counts_reset"]
    for other in results[1:]:
        assert all(torch.equal(other["biases"][n], b) for n, b in first["biases"].items())
