"""Training helpers shared by the demo, the tests and the benchmarks.

Loss rule that keeps every gradient exact under any layout: each rank's loss is the sum over
its own tokens divided by the global valid-token count, and every reduction is a sum.

>>> from moefn.adapters.reference import get_preset
>>> batch = global_batch(get_preset("tiny"), batch=4, seq=16, seed=0)
>>> mine = local_batch(batch, MeshSpec(dp_shard=2, cp=2), rank=3)
>>> tuple(mine.input_ids.shape)  # half the rows, the head and tail chunks of the sequence
(2, 8)
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from contextlib import nullcontext
from typing import cast

import torch
import torch.distributed as dist
from attrs import define
from torch import Tensor, nn
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import loss_parallel

from moefn.adapters.reference.config import MoEConfig
from moefn.adapters.reference.transformer import causal_lm_loss, make_batch
from moefn.plan.arguments import expect_type, finite_number, int_at_least
from moefn.plan.errors import PlanError
from moefn.plan.mesh import MeshSpec
from moefn.train.accumulate import no_gradient_sync


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

    def split(self, parts: int) -> list[Batch]:
        """``parts`` micro-batches of equal rows (for gradient accumulation)."""
        rows = self.input_ids.shape[0]
        int_at_least(parts, "micro_batches")
        if rows % parts:
            raise PlanError.single("batch", "rows not divisible into micro-batches",
                                   f"{rows} rows, {parts} micro-batches",
                                   "use a number of micro-batches that divides the local rows")
        return [Batch(input_ids=i, position_ids=p, labels=label) for i, p, label in zip(
            self.input_ids.chunk(parts), self.position_ids.chunk(parts), self.labels.chunk(parts),
            strict=True)]


def global_batch(config: MoEConfig, batch: int, seq: int, seed: int) -> Batch:
    """``batch`` rows of ``seq`` random tokens of ``config``'s vocabulary (``seed`` fixes them)."""
    expect_type(config, MoEConfig, "config", "a MoEConfig", 'pass get_preset("tiny") or MoEConfig(...)')
    int_at_least(batch, "batch")
    int_at_least(seq, "seq")
    int_at_least(seed, "seed", minimum=0)
    input_ids, position_ids, labels = make_batch(config, batch, seq, seed)
    return Batch(input_ids=input_ids, position_ids=position_ids, labels=labels)


def local_batch(batch: Batch, mesh: MeshSpec, rank: int) -> Batch:
    """This rank's rows (data-parallel index) and sequence chunks (cp index, head-tail)."""
    expect_type(batch, Batch, "batch", "a Batch", "pass global_batch(...) or Batch(...)")
    expect_type(mesh, MeshSpec, "mesh", "a MeshSpec", "pass plan.mesh")
    if int_at_least(rank, "rank", minimum=0) >= mesh.world_size:
        raise PlanError.single("rank", "rank outside the mesh", rank,
                               f"use a rank in 0..{mesh.world_size - 1}")
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
            from moefn.realize.context_parallel import shard_sequence

            t = shard_sequence(t, mesh.cp, mesh.coordinate(rank, "cp"), dim=1)
        return t

    return Batch(input_ids=cut(batch.input_ids), position_ids=cut(batch.position_ids),
                 labels=cut(batch.labels))


def _step_loss(outputs: tuple[Tensor, ...], labels: Tensor, num_valid: int) -> Tensor:
    """Back-propagate this rank's loss; return its share of the global loss (a tp group's
    vocabulary-sharded loss, computed under ``loss_parallel``, divided among its ranks)."""
    sharded = isinstance(outputs[0], DTensor)
    with loss_parallel() if sharded else nullcontext():
        loss = causal_lm_loss(outputs, labels, num_valid)
        loss.backward()  # type: ignore[no-untyped-call]
    if not sharded:
        return loss.detach()
    replicated = cast(DTensor, loss.detach())  # the same over the tp group
    whole: Tensor = replicated.full_tensor()
    return whole / replicated.device_mesh.size()


def causal_lm_outputs(model: nn.Module, batch: Batch) -> tuple[Tensor, ...]:
    """The model's logits on ``batch`` (with MTP, the MTP head's after them). Called by keyword:
    a transformers causal LM's second positional argument is ``attention_mask``, not
    ``position_ids``; its cache stays off and its output record gives its ``logits``."""
    takes = inspect.signature(model.forward).parameters
    extra = {"use_cache": False} if "use_cache" in takes else {}
    outputs = model(input_ids=batch.input_ids, position_ids=batch.position_ids, **extra)
    logits = getattr(outputs, "logits", None)
    return (logits,) if isinstance(logits, Tensor) else tuple(outputs)


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, batch: Batch,
               num_valid: int, distributed: bool = True, micro_batches: int = 1) -> float:
    """One optimizer step; returns the global-batch loss (summed over ranks when distributed).

    With ``micro_batches > 1`` the batch runs in that many slices and gradients are reduced
    only after the last one (`moefn.train.accumulate.no_gradient_sync`). Vocabulary-sharded
    logits (tp) get their loss under ``loss_parallel``; a tp group's loss counts once."""
    expect_type(model, nn.Module, "model", "an nn.Module", "pass the realized model")
    expect_type(optimizer, torch.optim.Optimizer, "optimizer", "a torch.optim.Optimizer",
                "pass torch.optim.SGD(model.parameters(), lr=...) or another optimizer")
    expect_type(batch, Batch, "batch", "a Batch", "pass local_batch(...)")
    optimizer.zero_grad(set_to_none=True)
    pieces = batch.split(micro_batches)
    total = torch.zeros((), device=batch.input_ids.device)
    for i, piece in enumerate(pieces):
        with no_gradient_sync(model) if i < len(pieces) - 1 else nullcontext():
            total += _step_loss(causal_lm_outputs(model, piece), piece.labels, num_valid)
    optimizer.step()
    if distributed and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(total)
    return float(total)


def train(model: nn.Module, batch: Batch, num_valid: int, steps: int, lr: float,
          on_step: Callable[[int, float], None] | None = None,
          distributed: bool = True, micro_batches: int = 1) -> list[float]:
    """``steps`` SGD steps on one fixed batch; the list of global losses."""
    int_at_least(steps, "steps")
    finite_number(lr, "lr")
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    losses = []
    for step in range(steps):
        losses.append(train_step(model, optimizer, batch, num_valid, distributed, micro_batches))
        if on_step is not None:
            on_step(step, losses[-1])
    return losses
