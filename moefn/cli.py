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
from typing import TYPE_CHECKING

from moefn.errors import PlanError, group_problems
from moefn.names import HF_PRESET_NAMES, MODEL_PRESETS

if TYPE_CHECKING:  # torch loads after argument parsing, so that --help answers at once
    import torch
    from torch import nn

    from moefn.estimate import Estimate
    from moefn.mesh import MeshSpec
    from moefn.plan import ShardPlan

_DTYPES = {"bf16": "bfloat16", "fp32": "float32"}


def _mesh_text(text: str) -> str:
    """Syntax check for --mesh (a usage error, exit 2); sizes are checked by the plan (exit 1)."""
    if not re.fullmatch(r"\s*(\w+\s*=\s*\d+\s*)(,\s*\w+\s*=\s*\d+\s*)*", text):
        raise argparse.ArgumentTypeError(f"expected axis=size[,axis=size...], got {text!r}")
    return text


AC_MODES = ("none", "full", "router", "selective")
CP_COMMS = ("all_gather", "p2p")  # moefn.plan.CP_COMMS (not imported: the CLI starts without torch)
LAYOUT_OPTIONS: dict[str, tuple[str, ...] | None] = {
    "ac": AC_MODES, "dispatch": ("all_to_all", "all_gather"), "precision": tuple(_DTYPES),
    "cp_comm": CP_COMMS, "seq_len": None, "rows": None}  # None: a whole number of at least 1


def _layout_text(text: str) -> tuple[str, dict[str, str | int]]:
    """``MESH[:option=value,...]`` for --compare (a usage error, exit 2, when malformed).

    >>> _layout_text("dp_shard=8,ep=4:ac=full,seq_len=4096")
    ('dp_shard=8,ep=4', {'ac': 'full', 'seq_len': 4096})
    """
    mesh, _, rest = text.partition(":")
    options: dict[str, str | int] = {}
    for item in filter(None, (part.strip() for part in rest.split(","))):
        name, _, value = item.partition("=")
        if name not in LAYOUT_OPTIONS:
            raise argparse.ArgumentTypeError(
                f"unknown option {name!r} in {text!r}; options: {', '.join(LAYOUT_OPTIONS)}")
        allowed = LAYOUT_OPTIONS[name]
        if allowed is None:
            options[name] = _positive(value)
        elif value in allowed:
            options[name] = value
        else:
            raise argparse.ArgumentTypeError(f"{name}={value!r} in {text!r}: use one of {allowed}")
    return _mesh_text(mesh), options


def _positive(text: str) -> int:
    """A count flag (--tokens, --steps, ...): a whole number of at least 1 (else exit 2)."""
    if not (text.strip().isascii() and text.strip().isdigit()) or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}")
    return int(text)


MAX_LOCAL_RANKS = 64  # processes the CPU demo starts on one machine


def _local_ranks(text: str) -> int:
    """--nproc: 1 to MAX_LOCAL_RANKS processes (else exit 2, before any process starts)."""
    n = _positive(text)
    if n > MAX_LOCAL_RANKS:
        raise argparse.ArgumentTypeError(f"at most {MAX_LOCAL_RANKS} local ranks, got {n}; "
                                         "for more, launch on a cluster with torchrun")
    return n


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moefn", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    plan = sub.add_parser("plan", help="print the plan of a preset on a mesh (no GPU needed)")
    source = plan.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", choices=(*MODEL_PRESETS, *HF_PRESET_NAMES),
                        help="preset (hf-* presets are transformers models, need moefn[hf])")
    source.add_argument("--hf-config", metavar="PATH",
                        help="a transformers config.json (MoE causal LM, built on meta; moefn[hf])")
    target = plan.add_mutually_exclusive_group(required=True)
    target.add_argument("--mesh", type=_mesh_text, help="e.g. dp_shard=1024,ep=64")
    target.add_argument("--compare", nargs=2, type=_layout_text, metavar=("LAYOUT_A", "LAYOUT_B"),
                        help="print what changes from the plan on LAYOUT_A to the one on "
                             "LAYOUT_B; each is MESH[:option=value,...] with options "
                             f"{', '.join(LAYOUT_OPTIONS)} (e.g. dp_shard=8,ep=4:ac=full)")
    plan.add_argument("--dispatch", choices=("all_to_all", "all_gather"), default="all_to_all")
    plan.add_argument("--cp-comm", choices=CP_COMMS, default="all_gather",
                      help="how context parallelism moves K/V: all_gather, or p2p (ring: "
                           "K/V memory O(seq/cp))")
    plan.add_argument("--precision", "--param-dtype", dest="precision", choices=tuple(_DTYPES),
                      default="bf16", help="dtype FSDP gathers parameters in and computes with")
    plan.add_argument("--master-dtype", choices=tuple(_DTYPES), default=None,
                      help="dtype the sharded parameters, gradients and optimizer states are "
                           "kept in (default: the model's own; fp32 with AdamW = 16 bytes per "
                           "parameter)")
    plan.add_argument("--no-fsdp", action="store_true", help="leave plan_fsdp out")
    plan.add_argument("--ac", choices=AC_MODES, default="none",
                      help="activation checkpointing of every block (plan_ac); none leaves it out")
    plan.add_argument("--seq-len", type=_positive, default=None,
                      help="sequence length (required with cp > 1: plan_cp checks it)")
    plan.add_argument("--rows", type=_positive, default=1,
                      help="sequences per rank per micro-batch (with --seq-len)")
    plan.add_argument("--tokens", type=_positive, default=None,
                      help="tokens per rank per step, a shorthand for rows × seq_len / cp "
                           "(default 4096; not with --seq-len)")
    plan.add_argument("--optimizer", choices=("adamw", "sgd", "sgd_momentum"), default="adamw",
                      help="optimizer whose states the memory estimate counts")
    plan.add_argument("--top-k", type=_positive, default=None,
                      help="experts per token for the comm estimate (default: the routers')")
    plan.add_argument("--simulate", action="store_true",
                      help="realize the plan for representative ranks on a fake process group")
    plan.add_argument("--json", action="store_true", help="one JSON object on stdout")
    demo = sub.add_parser("demo", help="train the small preset on N local ranks vs one process")
    demo.add_argument("--nproc", type=_local_ranks, default=4,
                      help=f"local CPU ranks (processes), 1 to {MAX_LOCAL_RANKS}")
    demo.add_argument("--steps", type=_positive, default=5)
    demo.add_argument("--dispatch", choices=("all_to_all", "all_gather"), default="all_to_all")
    demo.add_argument("--micro-batches", type=_positive, default=1,
                      help="gradient accumulation: micro-batches per step, reduced once")
    demo.add_argument("--json", action="store_true")
    bench = sub.add_parser("bench", help="run benchmarks/ (from a repository checkout): tables "
                                         "in docs/benchmarks.md, JSON in results/")
    bench.add_argument("--steps", type=_positive, default=6,
                       help="timed steps per configuration (the first is warm-up)")
    return parser


def _memory_table(est: Estimate, optimizer: str) -> str:
    from moefn.estimate import STATE_COPIES
    from moefn.render import format_bytes as size

    m = est.memory
    rows = [f"memory of rank {est.rank} (gradients and {optimizer}'s {STATE_COPIES[optimizer]} "
            "states per parameter in the parameter's dtype):",
            f"  {'kind':<12}{'dtype':<18}{'params':>15}{'grads':>15}{'optimizer':>15}"]
    grads, states, dtypes = dict(m.grads), dict(m.optimizer), dict(m.dtypes)
    for kind, held in m.params:
        rows.append(f"  {kind:<12}{dtypes[kind]:<18}{size(held):>15}"
                    f"{size(grads.get(kind, 0)):>15}{size(states.get(kind, 0)):>15}")
    rows.append(f"  total {size(m.total)}, held all step; FSDP's forward all-gathers add up to "
                f"{size(m.gathered_peak)} at once on top")
    rows.append("  (unsharded parameters in the compute dtype); activations are not counted")
    return "\n".join(rows)


def _comm_table(est: Estimate) -> str:
    from moefn.render import format_bytes as size

    rows = [f"communication per step of rank {est.rank} (bytes each way):",
            f"  {'collective':<42}{'group':<14}{'calls':>6}{'received':>15}{'lower bound':>15}"]
    rows += [f"  {c.collective:<42}{'×'.join(c.axes):<14}{c.calls:>6}{size(c.received):>15}"
             f"{size(c.lower_bound):>15}" for c in est.comm]
    return "\n".join(rows)


def _model_builder(args: argparse.Namespace) -> Callable[[], nn.Module]:
    """What --model / --hf-config names, as a function that builds it (call it under meta),
    in --master-dtype when given."""
    import torch

    master = getattr(torch, _DTYPES[args.master_dtype]) if args.master_dtype else None
    if args.hf_config or args.model in HF_PRESET_NAMES:
        from moefn.hf.presets import build_hf_model, hf_config_from_json, hf_preset_config

        try:
            config = (hf_config_from_json(args.hf_config) if args.hf_config
                      else hf_preset_config(args.model))
        except Exception as err:  # noqa: BLE001 - transformers' config classes raise their own
            raise PlanError.single("", "cannot build the transformers config",
                                   args.hf_config or args.model,
                                   f"{err} (transformers models need moefn[hf])") from err
        return lambda: _build_foreign(build_hf_model, config, args.hf_config or args.model,
                                      dtype=master or torch.bfloat16)
    from moefn.models import MoETransformer, get_preset

    preset = get_preset(args.model)
    return lambda: MoETransformer(preset).to(master) if master else MoETransformer(preset)


def _build_foreign(build: Callable[..., nn.Module], config: object, source: str,
                   dtype: torch.dtype) -> nn.Module:
    """Build a transformers model; any error its code raises on a config is the config's."""
    import torch

    try:
        return build(config, device=str(torch.get_default_device()), dtype=dtype)
    except Exception as err:  # noqa: BLE001 - transformers/torch raise anything on bad values
        raise PlanError.single("", "transformers cannot build a model from this config", source,
                               f"fix the config ({type(err).__name__}: {str(err)[:200]})") from err


def _layout(args: argparse.Namespace, mesh: MeshSpec,
            options: dict[str, str | int] | None = None) -> argparse.Namespace:
    """The command's flags, overridden by one --compare side's options."""
    return argparse.Namespace(**{**vars(args), "mesh_spec": mesh, **(options or {})})


def _tokens_per_rank(layout: argparse.Namespace) -> int:
    """rows × seq_len / cp with --seq-len, else --tokens (default 4096)."""
    if layout.seq_len is None:
        return int(layout.tokens or 4096)
    return int(layout.rows * layout.seq_len // layout.mesh_spec.cp)


def _build_plan(layout: argparse.Namespace) -> ShardPlan:
    """compose(plan_cp, plan_ep, plan_ac, plan_fsdp) as the mesh and flags ask."""
    import torch

    from moefn.stage import Stage, compose, plan_or_raise
    from moefn.stages import plan_ac, plan_cp, plan_ep, plan_fsdp

    mesh = layout.mesh_spec
    with torch.device("meta"):
        model = _model_builder(layout)()
    stages: list[Stage] = []
    if mesh.cp > 1:
        stages.append(plan_cp(seq_len=layout.seq_len, comm=layout.cp_comm))
    if mesh.ep > 1:
        stages.append(plan_ep(dispatch=layout.dispatch))
    if layout.ac != "none":
        stages.append(plan_ac(mode=layout.ac))
    if not layout.no_fsdp:
        stages.append(plan_fsdp(precision=layout.precision))
    return plan_or_raise(compose(*stages)(model, mesh))


def _usage_problem(layout: argparse.Namespace) -> str | None:
    """What makes this layout a usage error (exit 2), if anything."""
    if layout.seq_len is not None and layout.tokens is not None:
        return "give --tokens or --seq-len (with --rows), not both"
    if layout.mesh_spec.cp > 1 and layout.seq_len is None:
        return (f"cp={layout.mesh_spec.cp} composes plan_cp, which needs the sequence length: "
                "add --seq-len (or seq_len=... on a --compare side)")
    return None


def _compare_command(args: argparse.Namespace) -> int:
    from moefn.mesh import MeshSpec

    try:
        layouts = [_layout(args, MeshSpec.parse(mesh), options) for mesh, options in args.compare]
        usage = next(filter(None, map(_usage_problem, layouts)), None)
        if usage:
            print(f"moefn plan: {usage}", file=sys.stderr)
            return 2
        a, b = map(_build_plan, layouts)
        print(a.diff(b))
    except PlanError as err:
        print(err)
        return 1
    return 0


def _plan_command(args: argparse.Namespace) -> int:
    if args.compare:
        return _compare_command(args)
    import attrs

    from moefn.comm import DTYPE_BYTES
    from moefn.cp_memory import cp_kv_bytes
    from moefn.estimate import _activation_dtype, estimate
    from moefn.layout import param_layouts
    from moefn.mesh import MeshSpec

    problems: list[dict[str, object]] = []
    steps: list[object] = []
    shapes: dict[str, list[object]] = {}
    memory: dict[str, object] = {}
    simulated: list[dict[str, object]] = []
    comm: list[dict[str, object]] = []
    text = ""
    world = tokens = 0
    try:
        mesh = MeshSpec.parse(args.mesh)
        world = mesh.world_size
        layout = _layout(args, mesh)
        usage = _usage_problem(layout)
        if usage:
            print(f"moefn plan: {usage}", file=sys.stderr)
            return 2
        plan = _build_plan(layout)
        steps = json.loads(plan.to_json())["plan"]["steps"]
        shapes = {name: [{"shape": list(shape), "ranks": ranks}
                         for shape, ranks in layout.local_shapes(mesh)]
                  for name, layout in param_layouts(plan).items()}
        tokens = _tokens_per_rank(layout)
        est = estimate(plan, rank=0, tokens_per_rank=tokens, top_k=args.top_k,
                       optimizer=args.optimizer)
        kv_held = cp_kv_bytes(plan, tokens, DTYPE_BYTES[_activation_dtype(plan)])
        memory = {"rank": 0, "params": dict(est.memory.params), "grads": dict(est.memory.grads),
                  "optimizer": dict(est.memory.optimizer), "optimizer_name": args.optimizer,
                  "dtypes": dict(est.memory.dtypes),
                  "total": est.memory.total,
                  "gathered_peak": est.memory.gathered_peak,
                  "cp_kv_bytes": kv_held}
        comm = [attrs.asdict(c) for c in est.comm]
        memory_text = _memory_table(est, args.optimizer)
        if kv_held:
            from moefn.render import format_bytes

            memory_text += f"\ncp K/V held per attention ({layout.cp_comm}): {format_bytes(kv_held)}"
        text = "\n".join([plan.diff(), "", memory_text, "", _comm_table(est)])
        if args.simulate:
            from moefn.simulate import simulate

            say = None if args.json else (lambda line: print(line, file=sys.stderr, flush=True))
            for r in simulate(plan, _model_builder(args), progress=say):
                simulated.append({"rank": r.rank, "seconds": round(r.seconds, 2),
                                  "parameters_checked": r.parameters,
                                  "ranks_checked": r.ranks_checked})
                text += (f"\nsimulated rank {r.rank}: realized in {r.seconds:.1f} s, "
                         f"{r.parameters} parameters match the plan; torch places the shards "
                         f"of {r.ranks_checked} ranks as planned")
    except PlanError as err:
        problems = [{"path": g.pattern if g.count > 1 else g.paths[0], "count": g.count,
                     "paths": list(g.paths), "message": g.message, "value": g.value,
                     "fix": g.fix} for g in group_problems(err.problems)]
        text = str(err)
    if args.json:
        print(json.dumps({"world_size": world, "tokens_per_rank": tokens, "steps": steps,
                          "problems": problems,
                          "local_shapes": shapes, "memory": memory, "comm": comm,
                          "simulated": simulated}))
    else:
        print(text)
    return 1 if problems else 0


def _demo_command(args: argparse.Namespace) -> int:
    from moefn.demo import DemoOptions, run_demo

    options = DemoOptions(nproc=args.nproc, steps=args.steps, dispatch=args.dispatch,
                          micro_batches=args.micro_batches, verbose=not args.json)
    try:
        result = run_demo(options)
    except PlanError as err:
        print(f"moefn demo: {' '.join(str(err).split())}", file=sys.stderr)
        return 1
    if result is None:
        return 0
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{'step':>4}  {'moefn':>12}  {'one process':>12}  {'|diff|':>9}")
        for i, (a, b) in enumerate(zip(result["losses"], result["reference_losses"],
                                       strict=True)):
            print(f"{i + 1:>4}  {a:>12.7f}  {b:>12.7f}  {abs(a - b):>9.2e}")
        if options.micro_batches > 1:
            print(f"accumulated {options.micro_batches} micro-batches per step (gradients "
                  "reduced once per step)")
        print(f"max |loss diff| = {result['max_abs_loss_diff']:.2e} on {result['nproc']} ranks, "
              f"mesh {result['mesh']}, in {result['seconds']} s")
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
