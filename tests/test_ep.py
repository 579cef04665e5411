"""Expert parallelism on real gloo ranks: parity with one process for every combination."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from moefn.plan.options import Dispatch, EPOptions, FSDPOptions
from tests.parity import Case, assert_parity, run_parity
from tests.ranks import RankPool


def ep(dispatch: Dispatch) -> EPOptions:
    return EPOptions(dispatch=dispatch)


FSDP = FSDPOptions(precision="fp32")
CASES = [
    # (id, mesh, stages, preset)
    ("ep2-a2a-fsdp", "dp_shard=4,ep=2", (ep("all_to_all"), FSDP), "tiny"),
    ("ep2-ag-fsdp", "dp_shard=4,ep=2", (ep("all_gather"), FSDP), "tiny"),
    ("ep4-a2a-fsdp", "dp_shard=4,ep=4", (ep("all_to_all"), FSDP), "tiny"),
    ("ep4-ag-fsdp", "dp_shard=4,ep=4", (ep("all_gather"), FSDP), "tiny"),
    ("ep2-a2a-alone", "dp_shard=4,ep=2", (ep("all_to_all"),), "tiny"),
    ("ep4-ag-alone", "dp_shard=4,ep=4", (ep("all_gather"),), "tiny"),
    ("ep2-a2a-full-model", "dp_shard=4,ep=2", (ep("all_to_all"), FSDP), "tiny-full"),
    ("ep2-ag-full-model", "dp_shard=4,ep=2", (ep("all_gather"), FSDP), "tiny-full"),
    ("ep2-hsdp", "dp_replicate=2,dp_shard=2,ep=2", (ep("all_to_all"), FSDP), "tiny"),
    ("ep2-replicated-alone", "dp_replicate=2,dp_shard=2,ep=2", (ep("all_gather"),), "tiny"),
]


@pytest.mark.parametrize(("mesh", "stages", "preset"), [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_ep_matches_one_process(ranks: Callable[[int], RankPool], mesh: str,
                                stages: Any, preset: str) -> None:
    assert_parity(ranks(4).run(run_parity, Case(mesh=mesh, stages=stages, preset=preset))[0])


def test_experts_fewer_than_shards_shard_on_dim_one(ranks: Callable[[int], RankPool]) -> None:
    # tiny-few-experts: 4 experts, ep=2 → 2 local experts on ep_shard=2... use dp_shard=4, ep=2
    # with 2 experts per rank and a 4-way ep_shard needs 8 ranks; instead use ep=4, 4 experts:
    # 1 local expert, ep_shard=1 (dim 0) — and ep=2 with 2 local experts on ep_shard=2 (dim 0);
    # the dim-1 path is covered at 4 ranks by a 2-expert model: ep=2 → 1 local, ep_shard=2.
    case = Case(mesh="dp_shard=4,ep=2", stages=(ep("all_to_all"), FSDP), preset="tiny-2experts")
    assert_parity(ranks(4).run(run_parity, case)[0])


@pytest.mark.parametrize("dispatch", ["all_to_all", "all_gather"])
def test_a_rank_that_receives_no_tokens_neither_hangs_nor_breaks_gradients(
        ranks: Callable[[int], RankPool], dispatch: str) -> None:
    # experts 0-3 live on the first rank of each EP pair: the second receives zero tokens, and
    # its experts get zero gradients (so only the first rank's experts are asserted nonzero)
    case = Case(mesh="dp_shard=4,ep=2", stages=(ep(dispatch), FSDP), preset="tiny-full",
                force_experts=(0, 1, 2, 3))
    result = ranks(4).run(run_parity, case)[0]
    assert result["max_loss_diff"] <= 1e-5
    assert all(name.endswith(("gate_up", "down")) for name in result["zero_grads"])
    assert max(result["grad_errors"].values()) <= 1e-5
