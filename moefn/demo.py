"""`moefn demo`: plan, realize and train the small preset on N ranks, next to one process.

>>> options = DemoOptions(nproc=4, steps=3)
>>> run_demo(options)["max_abs_loss_diff"] <= 1e-5  # 4 ranks, a minute; tests/test_cli.py  # doctest: +SKIP
True
"""

from __future__ import annotations

import sys
import time
from typing import Any

import torch
import torch.distributed as dist
from attrs import frozen

from moefn.adapters.reference import MoETransformer, get_preset
from moefn.analyse.render import diff
from moefn.launch import init_from_env, launched_by_torchrun, run_local
from moefn.plan.compose import Stage, compose
from moefn.plan.mesh import MeshSpec
from moefn.plan.options import Dispatch
from moefn.plan.stages import plan_ac, plan_cp, plan_ep, plan_fsdp
from moefn.realize import build_device_meshes, realize
from moefn.train.loop import global_batch, local_batch, train


@frozen(kw_only=True)
class DemoOptions:
    nproc: int = 4
    steps: int = 5
    preset: str = "small"
    batch: int = 8
    seq: int = 32
    lr: float = 0.25
    seed: int = 0
    dispatch: Dispatch = "all_to_all"
    ranks_per_node: int | None = None  # with dispatch="hierarchical": ep ranks per node
    micro_batches: int = 1
    verbose: bool = False  # rank 0 prints the plan and a header (stdout), progress (stderr)


def demo_mesh(nproc: int) -> MeshSpec:
    """cp=2 and ep=2 where they divide ``nproc``; the rest is dp_shard (4 ranks: 2 × 2, ep 2)."""
    cp = 2 if nproc % 2 == 0 else 1
    return MeshSpec(dp_shard=nproc // cp, cp=cp, ep=2 if nproc % 2 == 0 else 1)


def demo_stages(mesh: MeshSpec, options: DemoOptions) -> tuple[Stage, ...]:
    cp = (plan_cp(seq_len=options.seq),) if mesh.cp > 1 else ()
    ep = (plan_ep(dispatch=options.dispatch, ranks_per_node=options.ranks_per_node),)
    return (*cp, *(ep if mesh.ep > 1 else ()), plan_ac(mode="router"),
            plan_fsdp(precision="fp32"))


def demo_rows(options: DemoOptions, mesh: MeshSpec) -> int:
    """The global batch rows: ``options.batch`` rounded up to a multiple of data parallelism
    times the micro-batches."""
    dp = mesh.dp_replicate * mesh.dp_shard * options.micro_batches
    return -(-options.batch // dp) * dp


def demo_header(options: DemoOptions, world: int, backend: str, device: torch.device) -> str:
    """What the demo is about to do, on the world it really runs on."""
    mesh = demo_mesh(world)
    stages = ", ".join(s.name for s in demo_stages(mesh, options))
    accumulate = (f"; each step accumulates {options.micro_batches} micro-batches, gradients "
                  "reduced once per step" if options.micro_batches > 1 else "")
    return (f"training {options.steps} steps on {world} rank{'s' if world != 1 else ''} "
            f"({backend}, {device.type}), mesh {mesh.as_text()}, stages {stages}, global batch "
            f"{demo_rows(options, mesh)}×{options.seq} tokens{accumulate} ...")


def _progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _train_rank(rank: int, world: int, options: DemoOptions, device: torch.device) -> list[float]:
    config = get_preset(options.preset)
    mesh = demo_mesh(world)
    torch.manual_seed(options.seed)
    model = MoETransformer(config).to(device)
    plan = compose(*demo_stages(mesh, options))(model, mesh).unwrap()
    talk = options.verbose and rank == 0
    if talk:
        print(diff(plan), flush=True)
        print(demo_header(options, world, dist.get_backend(), device), flush=True)
    realize(plan, model, build_device_meshes(mesh, device.type))
    batch = global_batch(config, demo_rows(options, mesh), options.seq, options.seed)
    mine = local_batch(batch, mesh, rank).to(device)
    micro = f" ({options.micro_batches} micro-batches)" if options.micro_batches > 1 else ""

    def report(step: int, loss: float) -> None:
        _progress(f"  step {step + 1}/{options.steps}  loss {loss:.6f}{micro}")

    return train(model, mine, batch.num_valid, options.steps, options.lr,
                 on_step=report if talk else None, micro_batches=options.micro_batches)


def _local_rank(rank: int, world: int, options: DemoOptions) -> list[float]:
    return _train_rank(rank, world, options, torch.device("cpu"))


def reference_losses(options: DemoOptions, world: int, device: torch.device) -> list[float]:
    """The same steps in one process on the whole global batch of a ``world``-rank run."""
    config = get_preset(options.preset)
    torch.manual_seed(options.seed)
    model = MoETransformer(config).to(device)
    rows = demo_rows(options, demo_mesh(world))
    batch = global_batch(config, rows, options.seq, options.seed).to(device)
    return train(model, batch, batch.num_valid, options.steps, options.lr,
                 distributed=False)


def run_demo(options: DemoOptions) -> dict[str, Any] | None:
    """Run the demo; under torchrun every rank trains and rank 0 returns the comparison.

    With ``options.verbose`` only rank 0 prints: the plan and a header naming the real world
    size, mesh and backend (stdout), then each step's loss and the reference run (stderr)."""
    started = time.perf_counter()
    if launched_by_torchrun():
        device = init_from_env()
        world = dist.get_world_size()
        losses = _train_rank(dist.get_rank(), world, options, device)
        if dist.get_rank() != 0:
            return None
    else:
        device = torch.device("cpu")
        world = options.nproc
        losses = run_local(world, _local_rank, options)[0]
    if options.verbose:
        _progress(f"the same {options.steps} steps in one process ...")
    reference = reference_losses(options, world, device)
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
