"""Command line: ``moefn plan`` (pure, meta device) and ``moefn demo`` (trains on local ranks).

Exit codes: 0 valid, 1 the plan has problems, 2 usage errors.

>>> main(["plan", "--model", "tiny", "--mesh", "dp_shard=4,ep=2"])     # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import sys
from collections.abc import Callable, Sequence

import attrs
import torch
from torch import nn

from moefn.errors import PlanError
from moefn.estimate import Estimate, estimate
from moefn.hf.presets import HF_PRESETS
from moefn.layout import param_layouts
from moefn.mesh import MeshSpec
from moefn.models import PRESETS, MoETransformer, get_preset
from moefn.plan import ShardPlan
from moefn.stage import Stage, compose, plan_or_raise
from moefn.stages import plan_ep, plan_fsdp


def _mesh_text(text: str) -> str:
    """Syntax check for --mesh (a usage error, exit 2); sizes are checked by the plan (exit 1)."""
    if not re.fullmatch(r"\s*(\w+\s*=\s*\d+\s*)(,\s*\w+\s*=\s*\d+\s*)*", text):
        raise argparse.ArgumentTypeError(f"expected axis=size[,axis=size...], got {text!r}")
    return text


def _positive(text: str) -> int:
    """A count flag (--tokens, --steps, ...): a whole number of at least 1 (else exit 2)."""
    if not (text.strip().isascii() and text.strip().isdigit()) or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}")
    return int(text)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moefn", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    plan = sub.add_parser("plan", help="print the plan of a preset on a mesh (no GPU needed)")
    source = plan.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", choices=(*PRESETS, *HF_PRESETS),
                        help="preset (hf-* presets are transformers models, need moefn[hf])")
    source.add_argument("--hf-config", metavar="PATH",
                        help="a transformers config.json (MoE causal LM, built on meta; moefn[hf])")
    target = plan.add_mutually_exclusive_group(required=True)
    target.add_argument("--mesh", type=_mesh_text, help="e.g. dp_shard=1024,ep=64")
    target.add_argument("--compare", nargs=2, type=_mesh_text, metavar=("MESH_A", "MESH_B"),
                        help="print what changes from the plan on MESH_A to the one on MESH_B")
    plan.add_argument("--dispatch", choices=("all_to_all", "all_gather"), default="all_to_all")
    plan.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    plan.add_argument("--no-fsdp", action="store_true", help="leave plan_fsdp out")
    plan.add_argument("--tokens", type=_positive, default=4096, help="tokens per rank per step")
    plan.add_argument("--optimizer", choices=("adamw", "sgd", "sgd_momentum"), default="adamw",
                      help="optimizer whose states the memory estimate counts")
    plan.add_argument("--top-k", type=_positive, default=None,
                      help="experts per token for the comm estimate (default: the routers')")
    plan.add_argument("--simulate", action="store_true",
                      help="realize the plan for representative ranks on a fake process group")
    plan.add_argument("--json", action="store_true", help="one JSON object on stdout")
    demo = sub.add_parser("demo", help="train the small preset on N local ranks vs one process")
    demo.add_argument("--nproc", type=_positive, default=4)
    demo.add_argument("--steps", type=_positive, default=5)
    demo.add_argument("--dispatch", choices=("all_to_all", "all_gather"), default="all_to_all")
    demo.add_argument("--micro-batches", type=_positive, default=1,
                      help="gradient accumulation: micro-batches per step, reduced once")
    demo.add_argument("--json", action="store_true")
    bench = sub.add_parser("bench", help="run benchmarks/ (from a repository checkout): tables "
                                         "in docs/benchmarks.md, JSON in results/")
    bench.add_argument("--steps", type=_positive, default=6)
    return parser


def _size(n: int) -> str:
    """Bytes in the largest unit that keeps the number at or above 1 (B up to GiB)."""
    value, unit = float(n), "B"
    for bigger in ("KiB", "MiB", "GiB"):
        if value < 1024:
            break
        value, unit = value / 1024, bigger
    return f"{value:.3f} {unit}" if unit != "B" else f"{n} B"


def _memory_table(est: Estimate, optimizer: str) -> str:
    m = est.memory
    rows = [f"memory of rank {est.rank} ({optimizer} states in the parameter dtype):",
            f"  {'kind':<12}{'params':>15}{'grads':>15}{'optimizer':>15}"]
    grads, states = dict(m.grads), dict(m.optimizer)
    for kind, size in m.params:
        rows.append(f"  {kind:<12}{_size(size):>15}{_size(grads.get(kind, 0)):>15}"
                    f"{_size(states.get(kind, 0)):>15}")
    rows.append(f"  total {_size(m.total)}; most gathered at once in forward {_size(m.gathered_peak)}")
    return "\n".join(rows)


def _comm_table(est: Estimate) -> str:
    rows = [f"communication per step of rank {est.rank} (bytes each way):",
            f"  {'collective':<42}{'group':<14}{'calls':>6}{'received':>15}{'lower bound':>15}"]
    rows += [f"  {c.collective:<42}{'×'.join(c.axes):<14}{c.calls:>6}{_size(c.received):>15}"
             f"{_size(c.lower_bound):>15}" for c in est.comm]
    return "\n".join(rows)


def _model_builder(args: argparse.Namespace) -> Callable[[], nn.Module]:
    """What --model / --hf-config names, as a function that builds it (call it under meta)."""
    if args.hf_config or args.model in HF_PRESETS:
        from moefn.hf.presets import build_hf_model, hf_config_from_json, hf_preset_config

        try:
            config = (hf_config_from_json(args.hf_config) if args.hf_config
                      else hf_preset_config(args.model))
        except Exception as err:  # noqa: BLE001 - transformers' config classes raise their own
            raise PlanError.single("", "cannot build the transformers config",
                                   args.hf_config or args.model,
                                   f"{err} (transformers models need moefn[hf])") from err
        return lambda: _build_foreign(build_hf_model, config, args.hf_config or args.model)
    preset = get_preset(args.model)
    return lambda: MoETransformer(preset)


def _build_foreign(build: Callable[..., nn.Module], config: object, source: str) -> nn.Module:
    """Build a transformers model; any error its code raises on a config is the config's."""
    try:
        return build(config, device=str(torch.get_default_device()))
    except Exception as err:  # noqa: BLE001 - transformers/torch raise anything on bad values
        raise PlanError.single("", "transformers cannot build a model from this config", source,
                               f"fix the config ({type(err).__name__}: {str(err)[:200]})") from err


def _build_plan(args: argparse.Namespace, mesh: MeshSpec) -> ShardPlan:
    with torch.device("meta"):
        model = _model_builder(args)()
    stages: list[Stage] = [plan_ep(dispatch=args.dispatch)] if mesh.ep > 1 else []
    if not args.no_fsdp:
        stages.append(plan_fsdp(precision=args.precision))
    return plan_or_raise(compose(*stages)(model, mesh))


def _compare_command(args: argparse.Namespace) -> int:
    try:
        a, b = (_build_plan(args, MeshSpec.parse(text)) for text in args.compare)
        print(a.diff(b))
    except PlanError as err:
        print(err)
        return 1
    return 0


def _plan_command(args: argparse.Namespace) -> int:
    if args.compare:
        return _compare_command(args)
    problems: list[dict[str, str]] = []
    steps: list[object] = []
    shapes: dict[str, list[object]] = {}
    memory: dict[str, object] = {}
    simulated: list[dict[str, object]] = []
    comm: list[dict[str, object]] = []
    text = ""
    world = 0
    try:
        mesh = MeshSpec.parse(args.mesh)
        world = mesh.world_size
        plan = _build_plan(args, mesh)
        steps = json.loads(plan.to_json())["plan"]["steps"]
        shapes = {name: [{"shape": list(shape), "ranks": ranks}
                         for shape, ranks in layout.local_shapes(mesh)]
                  for name, layout in param_layouts(plan).items()}
        est = estimate(plan, rank=0, tokens_per_rank=args.tokens, top_k=args.top_k,
                       optimizer=args.optimizer)
        memory = {"rank": 0, "params": dict(est.memory.params), "grads": dict(est.memory.grads),
                  "optimizer": dict(est.memory.optimizer), "optimizer_name": args.optimizer,
                  "total": est.memory.total,
                  "gathered_peak": est.memory.gathered_peak}
        comm = [attrs.asdict(c) for c in est.comm]
        text = "\n".join([plan.diff(), "", _memory_table(est, args.optimizer), "", _comm_table(est)])
        if args.simulate:
            from moefn.simulate import simulate

            for r in simulate(plan, _model_builder(args)):
                simulated.append({"rank": r.rank, "seconds": round(r.seconds, 2),
                                  "parameters_checked": r.parameters,
                                  "ranks_checked": r.ranks_checked})
                text += (f"\nsimulated rank {r.rank}: realized in {r.seconds:.1f} s, "
                         f"{r.parameters} parameters match the plan; torch places the shards "
                         f"of {r.ranks_checked} ranks as planned")
    except PlanError as err:
        problems = [{"path": p.path, "message": p.message, "value": p.value, "fix": p.fix}
                    for p in err.problems]
        text = str(err)
    if args.json:
        print(json.dumps({"world_size": world, "steps": steps, "problems": problems,
                          "local_shapes": shapes, "memory": memory, "comm": comm,
                          "simulated": simulated}))
    else:
        print(text)
    return 1 if problems else 0


def _demo_command(args: argparse.Namespace) -> int:
    from moefn.demo import DemoOptions, demo_mesh, demo_plan, run_demo

    options = DemoOptions(nproc=args.nproc, steps=args.steps, dispatch=args.dispatch,
                          micro_batches=args.micro_batches)
    try:
        plan = demo_plan(options, demo_mesh(options.nproc))
    except PlanError as err:
        print(f"moefn demo: {' '.join(str(err).split())}", file=sys.stderr)
        return 1
    if not args.json:
        print(plan.diff(), flush=True)
        print(f"training {options.steps} steps on {options.nproc} ranks (gloo) ...", flush=True)
    result = run_demo(options)
    if result is None:
        return 0
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{'step':>4}  {'moefn':>12}  {'one process':>12}  {'|diff|':>9}")
        for i, (a, b) in enumerate(zip(result["losses"], result["reference_losses"],
                                       strict=True)):
            print(f"{i + 1:>4}  {a:>12.7f}  {b:>12.7f}  {abs(a - b):>9.2e}")
        print(f"max |loss diff| = {result['max_abs_loss_diff']:.2e} on mesh {result['mesh']} "
              f"in {result['seconds']} s")
    return 0


def _bench_command(args: argparse.Namespace) -> int:
    sys.path.insert(0, os.getcwd())
    try:
        benchmarks = importlib.import_module("benchmarks.run")  # in the checkout, not the package
    except ImportError as err:
        print(f"moefn bench: run it from a moefn repository checkout ({err})", file=sys.stderr)
        return 2
    benchmarks.main(["--steps", str(args.steps)])
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "plan":
        return _plan_command(args)
    if args.command == "bench":
        return _bench_command(args)
    return _demo_command(args)


if __name__ == "__main__":
    sys.exit(main())
