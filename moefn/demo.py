"""`moefn demo`: plan, realize and train the small preset on N ranks, next to one process.

>>> result = run_demo(DemoOptions(nproc=4, steps=3))     # doctest: +SKIP
>>> result["max_abs_loss_diff"] <= 1e-5                   # doctest: +SKIP
True
"""

from __future__ import annotations

import sys
import time
from typing import Any

import torch
import torch.distributed as dist
from attrs import frozen

from moefn.launch import init_from_env, launched_by_torchrun, run_local
from moefn.mesh import MeshSpec
from moefn.models import MoETransformer, get_preset
from moefn.plan import ShardPlan
from moefn.realize import build_device_meshes, realize
from moefn.stage import Stage, compose
from moefn.stages import plan_ac, plan_cp, plan_ep, plan_fsdp
from moefn.train import global_batch, local_batch, train


@frozen(kw_only=True)
class DemoOptions:
    nproc: int = 4
    steps: int = 5
    preset: str = "small"
    batch: int = 8
    seq: int = 32
    lr: float = 0.25
    seed: int = 0
    dispatch: str = "all_to_all"
    micro_batches: int = 1


def demo_mesh(nproc: int) -> MeshSpec:
    """cp=2 and ep=2 where they divide ``nproc``; the rest is dp_shard (4 ranks: 2 × 2, ep 2)."""
    cp = 2 if nproc % 2 == 0 else 1
    return MeshSpec(dp_shard=nproc // cp, cp=cp, ep=2 if nproc % 2 == 0 else 1)


def demo_stages(mesh: MeshSpec, options: DemoOptions) -> tuple[Stage, ...]:
    cp = (plan_cp(seq_len=options.seq),) if mesh.cp > 1 else ()
    ep = (plan_ep(dispatch="all_gather" if options.dispatch == "all_gather" else "all_to_all"),)
    return (*cp, *(ep if mesh.ep > 1 else ()), plan_ac(mode="router"),
            plan_fsdp(precision="fp32"))


def demo_rows(options: DemoOptions, mesh: MeshSpec) -> int:
    """The global batch rows: ``options.batch`` rounded up to a multiple of data parallelism
    times the micro-batches."""
    dp = mesh.dp_replicate * mesh.dp_shard * options.micro_batches
    return -(-options.batch // dp) * dp


def demo_plan(options: DemoOptions, mesh: MeshSpec) -> ShardPlan:
    with torch.device("meta"):
        model = MoETransformer(get_preset(options.preset))
    return compose(*demo_stages(mesh, options))(model, mesh).unwrap()


def _progress(step: int, loss: float, total: int) -> None:
    print(f"  step {step + 1}/{total}  loss {loss:.6f}", file=sys.stderr, flush=True)


def _train_rank(rank: int, world: int, options: DemoOptions, device: torch.device) -> list[float]:
    config = get_preset(options.preset)
    mesh = demo_mesh(world)
    torch.manual_seed(options.seed)
    model = MoETransformer(config).to(device)
    plan = compose(*demo_stages(mesh, options))(model, mesh).unwrap()
    realize(plan, model, build_device_meshes(mesh, device.type))
    batch = global_batch(config, demo_rows(options, mesh), options.seq, options.seed)
    mine = local_batch(batch, mesh, rank).to(device)
    report = (lambda s, loss: _progress(s, loss, options.steps)) if rank == 0 else None
    return train(model, mine, batch.num_valid, options.steps, options.lr, on_step=report,
                 micro_batches=options.micro_batches)


def _local_rank(rank: int, world: int, options: DemoOptions) -> list[float]:
    return _train_rank(rank, world, options, torch.device("cpu"))


def reference_losses(options: DemoOptions, device: torch.device) -> list[float]:
    """The same steps in one process on the whole global batch."""
    config = get_preset(options.preset)
    torch.manual_seed(options.seed)
    model = MoETransformer(config).to(device)
    rows = demo_rows(options, demo_mesh(options.nproc))
    batch = global_batch(config, rows, options.seq, options.seed).to(device)
    return train(model, batch, batch.num_valid, options.steps, options.lr,
                 distributed=False)


def run_demo(options: DemoOptions) -> dict[str, Any] | None:
    """Run the demo; under torchrun every rank trains and rank 0 returns the comparison."""
    started = time.perf_counter()
    if launched_by_torchrun():
        device = init_from_env()
        world = dist.get_world_size()
        losses = _train_rank(dist.get_rank(), world, options, device)
        if dist.get_rank() != 0:
            return None
        reference = reference_losses(options, device)
    else:
        world = options.nproc
        losses = run_local(world, _local_rank, options)[0]
        reference = reference_losses(options, torch.device("cpu"))
    diffs = [abs(a - b) for a, b in zip(losses, reference, strict=True)]
    return {
        "nproc": world,
        "mesh": demo_mesh(world).as_text(),
        "stages": [s.name for s in demo_stages(demo_mesh(world), options)],
        "micro_batches": options.micro_batches,
        "losses": losses,
        "reference_losses": reference,
        "max_abs_loss_diff": max(diffs, default=0.0),
        "seconds": round(time.perf_counter() - started, 2),
    }
