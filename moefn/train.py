"""Training helpers shared by the demo, the tests and the benchmarks.

Loss rule that keeps every gradient exact under any layout: each rank's loss is the sum over
its own tokens divided by the global valid-token count, and every reduction is a sum.

>>> batch = global_batch(get_preset("tiny"), batch=4, seq=16, seed=0)   # doctest: +SKIP
>>> mine = local_batch(batch, MeshSpec(dp_shard=2, cp=2), rank=3)       # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from attrs import define
from torch import Tensor, nn

from moefn.errors import PlanError
from moefn.mesh import MeshSpec
from moefn.models import MoEConfig, causal_lm_loss, make_batch


@define(kw_only=True, eq=False)
class Batch:
    input_ids: Tensor
    position_ids: Tensor
    labels: Tensor

    def to(self, device: torch.device | str) -> Batch:
        return Batch(input_ids=self.input_ids.to(device), position_ids=self.position_ids.to(device),
                     labels=self.labels.to(device))

    @property
    def num_valid(self) -> int:
        return int((self.labels != -100).sum())


def global_batch(config: MoEConfig, batch: int, seq: int, seed: int) -> Batch:
    input_ids, position_ids, labels = make_batch(config, batch, seq, seed)
    return Batch(input_ids=input_ids, position_ids=position_ids, labels=labels)


def local_batch(batch: Batch, mesh: MeshSpec, rank: int) -> Batch:
    """This rank's rows (data-parallel index) and sequence chunks (cp index, head-tail)."""
    dp = mesh.dp_replicate * mesh.dp_shard
    rows = batch.input_ids.shape[0]
    if rows % dp:
        raise PlanError.single("batch", "global batch rows not divisible by data parallelism",
                               f"{rows} rows, dp_replicate×dp_shard={dp}",
                               f"use a multiple of {dp} rows")
    index = mesh.coordinate(rank, "dp_replicate") * mesh.dp_shard + mesh.coordinate(rank,
                                                                                    "dp_shard")
    per = rows // dp

    def cut(t: Tensor) -> Tensor:
        t = t[index * per:(index + 1) * per]
        if mesh.cp > 1:
            from moefn.runtime.context_parallel import shard_sequence

            t = shard_sequence(t, mesh.cp, mesh.coordinate(rank, "cp"), dim=1)
        return t

    return Batch(input_ids=cut(batch.input_ids), position_ids=cut(batch.position_ids),
                 labels=cut(batch.labels))


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, batch: Batch,
               num_valid: int, distributed: bool = True) -> float:
    """One optimizer step; returns the global-batch loss (summed over ranks when distributed)."""
    optimizer.zero_grad(set_to_none=True)
    outputs = model(batch.input_ids, batch.position_ids)
    loss = causal_lm_loss(outputs, batch.labels, num_valid)
    loss.backward()  # type: ignore[no-untyped-call]
    optimizer.step()
    total = loss.detach().clone()
    if distributed and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(total)
    return float(total)


def train(model: nn.Module, batch: Batch, num_valid: int, steps: int, lr: float,
          on_step: Callable[[int, float], None] | None = None,
          distributed: bool = True) -> list[float]:
    """``steps`` SGD steps on one fixed batch; the list of global losses."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    losses = []
    for step in range(steps):
        losses.append(train_step(model, optimizer, batch, num_valid, distributed))
        if on_step is not None:
            on_step(step, losses[-1])
    return losses
