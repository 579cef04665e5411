"""FSDP2's reduce-scatter on gloo runs as moefn's all-to-all and local sum (4 gloo ranks): the
shard gloo's own reduce-scatter gives, counted by CommLedger as that same reduce-scatter, and
the only reduce-scatter a realized plan's step runs."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

from moefn.adapters.reference import causal_lm_loss
from moefn.analyse.estimate import estimate
from moefn.analyse.ledger import CommLedger, Traffic
from moefn.plan.options import EPOptions, FSDPOptions
from moefn.realize.gloo_reduce_scatter import reduce_scatter_by_all_to_all
from moefn.train.loop import global_batch, local_batch
from tests.parity import Case, build_pair
from tests.ranks import RankPool

Totals = dict[tuple[str, tuple[int, ...]], Traffic]


def _ours_and_gloos(rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor, Totals, Totals]:
    group = dist.group.WORLD
    assert group is not None
    torch.manual_seed(rank)
    gradients = torch.randn(world * 5)
    ours, gloos = torch.empty(5), torch.empty(5)
    with CommLedger() as counted:
        reduce_scatter_by_all_to_all(ours, gradients, group.group_name)
    with CommLedger() as reference:
        dist.reduce_scatter_single(gloos, gradients, group=group)
    return ours, gloos, counted.totals(), reference.totals()


def test_sums_and_counts_as_the_reduce_scatter(ranks: Callable[[int], RankPool]) -> None:
    for ours, gloos, counted, reference in ranks(4).run(_ours_and_gloos):
        torch.testing.assert_close(ours, gloos)  # the same sum, up to its order
        assert counted == reference


class _OpCounter(TorchDispatchMode):  # type: ignore[no-untyped-call]  # untyped in torch
    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.calls: Counter[str] = Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.calls[f"{func.namespace}::{func.overloadpacket.__name__}"] += 1
        return func(*args, **(kwargs or {}))


def _reduce_scatters(rank: int, world: int) -> tuple[Counter[str], int]:
    case = Case(mesh="dp_shard=4,ep=2",
                stages=(EPOptions(dispatch="all_to_all"), FSDPOptions(precision="fp32")))
    reference, model, plan = build_pair(case)
    batch = global_batch(reference.config, case.batch, case.seq, case.seed)
    mine = local_batch(batch, plan.mesh, rank)
    with _OpCounter() as ops:
        causal_lm_loss(model(mine.input_ids, mine.position_ids), mine.labels,
                       batch.num_valid).backward()
    predicted = sum(c.calls for c in estimate(plan, rank, tokens_per_rank=mine.input_ids.numel())
                    .comm if c.op == "reduce_scatter")
    return Counter({k: v for k, v in ops.calls.items() if "reduce_scatter" in k}), predicted


def test_every_fsdp_unit_reduce_scatters_by_all_to_all(ranks: Callable[[int], RankPool]) -> None:
    for calls, predicted in ranks(4).run(_reduce_scatters):
        assert predicted > 0
        assert calls == {"moefn::reduce_scatter_by_all_to_all": predicted}
