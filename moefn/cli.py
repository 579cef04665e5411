"""Command line: ``moefn plan`` (pure, meta device) and ``moefn demo`` (trains on local ranks).

Exit codes: 0 valid, 1 the plan has problems, 2 usage errors.

>>> main(["plan", "--model", "tiny", "--mesh", "dp_shard=4,ep=2"])  # doctest: +ELLIPSIS
moefn plan: MoETransformer (moefn) on dp_replicate=1 dp_shard=4 cp=1 ep=2 ...
0
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

import attrs

from moefn.names import HF_PRESET_NAMES, MODEL_PRESETS
from moefn.plan.dtypes import SHORT_NAMES
from moefn.plan.errors import PlanError, group_problems

if TYPE_CHECKING:  # torch loads after argument parsing, so that --help answers at once
    import torch
    from torch import nn

    from moefn.analyse.estimate import Estimate
    from moefn.plan.mesh import MeshSpec
    from moefn.plan.records import ShardPlan


def _mesh_text(text: str) -> str:
    """Syntax check for --mesh (a usage error, exit 2); sizes are checked by the plan (exit 1)."""
    if not re.fullmatch(r"\s*(\w+\s*=\s*\d+\s*)(,\s*\w+\s*=\s*\d+\s*)*", text):
        raise argparse.ArgumentTypeError(f"expected axis=size[,axis=size...], got {text!r}")
    return text


AC_MODES = ("none", "full", "router", "selective")
CP_COMMS = ("all_gather", "p2p")  # moefn.plan.CP_COMMS (not imported: the CLI starts without torch)
DISPATCHES = ("all_to_all", "all_gather", "hierarchical")  # plan_ep's
LAYOUT_OPTIONS: dict[str, tuple[str, ...] | None] = {
    "ac": AC_MODES, "dispatch": DISPATCHES, "precision": tuple(SHORT_NAMES), "cp_comm": CP_COMMS,
    "seq_len": None, "rows": None, "ranks_per_node": None}  # None: a whole number of at least 1


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


def _rank_list(text: str) -> tuple[int, ...]:
    """--simulate-ranks: comma-separated rank numbers such as ``0,4095`` (else exit 2)."""
    parts = [part.strip() for part in text.split(",")]
    if not all(part.isascii() and part.isdigit() for part in parts):
        raise argparse.ArgumentTypeError(f"expected ranks such as 0,4095, got {text!r}")
    return tuple(sorted({int(part) for part in parts}))


def _size(text: str) -> int:
    """--gpu-memory: a size such as 80GiB (else exit 2 naming the accepted units)."""
    from moefn.analyse.fit import parse_size

    try:
        return parse_size(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from err


def _reserve(text: str) -> int | float:
    """--reserve: a size or a share of --gpu-memory (10%)."""
    from moefn.analyse.fit import parse_reserve

    try:
        return parse_reserve(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from err


def _imbalance(text: str) -> float:
    """--imbalance: received rows relative to balanced routing, at least 1."""
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value >= 1.0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number of at least 1 (1 = balanced), "
                                         f"got {text!r}")
    return value


MAX_LOCAL_RANKS = 64  # processes the CPU demo starts on one machine


def _local_ranks(text: str) -> int:
    """--nproc: 1 to MAX_LOCAL_RANKS processes (else exit 2, before any process starts)."""
    n = _positive(text)
    if n > MAX_LOCAL_RANKS:
        raise argparse.ArgumentTypeError(f"at most {MAX_LOCAL_RANKS} local ranks, got {n}; "
                                         "for more, launch on a cluster with torchrun")
    return n


def _calibration_ranks(text: str) -> int:
    """calibrate --nproc: collectives need a peer, so 2 to MAX_LOCAL_RANKS (else exit 2)."""
    n = _local_ranks(text)
    if n < 2:
        raise argparse.ArgumentTypeError(f"collectives need at least 2 ranks, got {n}: use "
                                         "--nproc 2 or more (the GPUs of one node)")
    return n


def _writable_file(text: str) -> str:
    """calibrate --out: a file whose directory exists, checked before minutes of measuring."""
    import os

    folder = os.path.dirname(os.path.abspath(text))
    if os.path.isdir(text) or not os.path.isdir(folder) or not os.access(folder, os.W_OK):
        raise argparse.ArgumentTypeError(f"cannot write a profile to {text!r}: name a file in "
                                         "an existing, writable directory (e.g. mine.json)")
    return text


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
    target.add_argument("--search", action="store_true",
                        help="rank every layout of --world that fits --gpu-memory by predicted "
                             "step time (needs --world, --gpu-memory, --seq-len, "
                             "--global-batch-tokens)")
    plan.add_argument("--world", type=_positive, default=None, help="--search: ranks (GPUs)")
    plan.add_argument("--gpus-per-node", type=_positive, default=8,
                      help="--search: consecutive ranks sharing a node (default 8)")
    plan.add_argument("--global-batch-tokens", type=_positive, default=None, metavar="T",
                      help="--search: tokens per optimizer step (micro-batches = T / (seq_len "
                           "× rows × dp_replicate × dp_shard))")
    plan.add_argument("--hardware", default="h100-sxm", metavar="NAME|FILE",
                      help="--search: a hardware profile (h100-sxm, h200, b200, mi300x, or a "
                           "JSON file from `moefn calibrate`)")
    plan.add_argument("--top", type=_positive, default=3, help="--search: layouts to report")
    plan.add_argument("--no-reshard-after-forward", dest="reshard_after_forward",
                      action="store_false",
                      help="FSDP keeps each unit gathered from forward to backward")
    plan.add_argument("--dispatch", choices=DISPATCHES, default="all_to_all",
                      help="how tokens reach their experts' ranks; hierarchical crosses once per "
                           "destination node, then fans out inside it (needs --ranks-per-node)")
    plan.add_argument("--ranks-per-node", type=_positive, default=None, metavar="R",
                      help="with --dispatch hierarchical: consecutive ep ranks sharing a node "
                           "(GPUs per node), dividing ep")
    plan.add_argument("--cp-comm", choices=CP_COMMS, default="all_gather",
                      help="how context parallelism moves K/V: all_gather, or p2p (ring: "
                           "K/V memory O(seq/cp))")
    plan.add_argument("--precision", "--param-dtype", dest="precision", choices=tuple(SHORT_NAMES),
                      default="bf16", help="dtype FSDP gathers parameters in and computes with")
    plan.add_argument("--master-dtype", choices=tuple(SHORT_NAMES), default=None,
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
                      help="tokens per rank per step (with tp, per tp group), a shorthand for "
                           "rows × seq_len / cp (default 4096; not with --seq-len)")
    plan.add_argument("--gpu-memory", type=_size, default=None, metavar="SIZE",
                      help="device memory per rank, e.g. 80GiB: exit 1 when the worst rank's "
                           "predicted peak exceeds it minus --reserve")
    plan.add_argument("--reserve", type=_reserve, default=None, metavar="SIZE|PCT",
                      help="set aside for the CUDA context, NCCL and allocator fragmentation "
                           "(default 10%% of --gpu-memory)")
    plan.add_argument("--imbalance", type=_imbalance, default=1.0,
                      help="rows an expert rank receives relative to balanced routing (default 1)")
    plan.add_argument("--optimizer", choices=("adamw", "sgd", "sgd_momentum"), default="adamw",
                      help="optimizer whose states the memory estimate counts")
    plan.add_argument("--top-k", type=_positive, default=None,
                      help="experts per token for the comm estimate (default: the routers')")
    plan.add_argument("--simulate", action="store_true",
                      help="realize the plan for representative ranks on a fake process group")
    plan.add_argument("--simulate-ranks", type=_rank_list, default=None, metavar="RANKS",
                      help="simulate these ranks instead (e.g. 0,4095; implies --simulate); "
                           "each realized rank checks every rank's shards")
    plan.add_argument("--json", action="store_true", help="one JSON object on stdout")
    demo = sub.add_parser("demo", help="train the small preset on N local ranks vs one process")
    demo.add_argument("--nproc", type=_local_ranks, default=4,
                      help=f"local CPU ranks (processes), 1 to {MAX_LOCAL_RANKS}")
    demo.add_argument("--steps", type=_positive, default=5)
    demo.add_argument("--dispatch", choices=DISPATCHES, default="all_to_all")
    demo.add_argument("--ranks-per-node", type=_positive, default=None, metavar="R",
                      help="with --dispatch hierarchical: consecutive ep ranks sharing a "
                           "\"node\", dividing the demo's ep (2)")
    demo.add_argument("--micro-batches", type=_positive, default=1,
                      help="gradient accumulation: micro-batches per step, reduced once")
    demo.add_argument("--json", action="store_true")
    cal = sub.add_parser("calibrate", help="measure this machine (matmul, per-op overhead, "
                                           "collectives on N local ranks) into a --hardware "
                                           "profile for plan --search")
    cal.add_argument("--nproc", type=_calibration_ranks, default=4,
                     help="local ranks running at once (2 or more)")
    cal.add_argument("--out", type=_writable_file, default="hardware.json",
                     help="where to write the profile")
    bench = sub.add_parser("bench", help="run benchmarks/ (from a repository checkout): tables "
                                         "in docs/benchmarks.md, JSON in results/")
    bench.add_argument("--steps", type=_positive, default=6,
                       help="timed steps per configuration (the first is warm-up)")
    return parser


def _memory_table(est: Estimate, optimizer: str) -> str:
    from moefn.analyse.estimate import STATE_COPIES
    from moefn.analyse.render import format_bytes as size

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
    rows.append("  (unsharded parameters in the compute dtype)")
    return "\n".join(rows)


def _activation_table(est: Estimate, layout: argparse.Namespace) -> str:
    from moefn.analyse.fit import reserve_bytes
    from moefn.analyse.render import format_bytes as size

    act = est.activations
    if act is None or est.peak is None:
        return ""
    rows_, seq_len = _micro_batch(layout)
    tp = layout.mesh_spec.tp
    tokens = (f"{act.tokens} tokens per tp group, {act.tokens // tp} per rank" if tp > 1
              else f"{act.tokens} tokens per rank")
    lines = [f"activations of rank {est.rank} at its peak ({rows_} × {seq_len} per micro-batch, "
             f"{tokens}, during {act.phase}; fused attention, no seq×seq):"]
    for part, value in act.parts:
        worst = (f"   (all ep·top_k rows to this rank: {size(act.dispatch_worst)})"
                 if part == "dispatch" and layout.mesh_spec.ep > 1 else "")
        lines.append(f"  {part:<24}{size(value):>15}{worst}")
    state = est.memory.total - est.memory.offloaded
    lines.append(f"  peak {size(est.peak)} = sharded state {size(state)} + buffers "
                 f"{size(est.peak - state - act.total)} + activations {size(act.total)} "
                 "(not counted: allocator fragmentation, CUDA context, NCCL buffers)")
    if layout.gpu_memory is not None:
        reserve = reserve_bytes(layout.reserve, layout.gpu_memory)
        verdict = "fits" if est.peak <= layout.gpu_memory - reserve else "does NOT fit"
        lines.append(f"  {verdict} in --gpu-memory {size(layout.gpu_memory)} minus --reserve "
                     f"{size(reserve)}")
    return "\n".join(lines)


def _comm_table(est: Estimate) -> str:
    from moefn.analyse.render import format_bytes as size

    rows = [f"communication per step of rank {est.rank} (bytes each way):",
            f"  {'collective':<42}{'group':<14}{'calls':>6}{'received':>15}{'lower bound':>15}"]
    rows += [f"  {c.collective:<42}{'×'.join(c.axes):<14}{c.calls:>6}{size(c.received):>15}"
             f"{size(c.lower_bound):>15}" for c in est.comm]
    if any(c.hop for c in est.comm):
        rows.append("  hierarchical dispatch runs on parts of the ep group; its lower bound is one "
                    "row per (token, destination node)\n  across nodes, one per (token, other "
                    "destination rank) within a node")
    return "\n".join(rows)


def _model_builder(args: argparse.Namespace) -> Callable[[], nn.Module]:
    """What --model / --hf-config names, as a function that builds it (call it under meta),
    in --master-dtype when given."""
    import torch

    master = getattr(torch, SHORT_NAMES[args.master_dtype]) if args.master_dtype else None
    if args.hf_config or args.model in HF_PRESET_NAMES:
        from moefn.adapters.transformers.presets import build_hf_model, hf_config_from_json, hf_preset_config

        try:
            config = (hf_config_from_json(args.hf_config) if args.hf_config
                      else hf_preset_config(args.model))
        except Exception as err:  # noqa: BLE001 - transformers' config classes raise their own
            raise PlanError.single("", "cannot build the transformers config",
                                   args.hf_config or args.model,
                                   "pass a transformers config.json of an MoE causal LM (it "
                                   f"failed with {type(err).__name__}: {err}; transformers "
                                   "models need moefn[hf])") from err
        return lambda: _build_foreign(build_hf_model, config, args.hf_config or args.model,
                                      dtype=master or torch.bfloat16)
    from moefn.adapters.reference import MoETransformer, get_preset

    preset = get_preset(args.model)
    return lambda: MoETransformer(preset).to(master) if master else MoETransformer(preset)


def _build_foreign(build: Callable[..., nn.Module], config: object, source: str,
                   dtype: torch.dtype) -> nn.Module:
    """Build a transformers model; any error its code raises on a config is the config's."""
    import torch

    try:
        return build(config, device=str(torch.get_default_device()), dtype=dtype)
    except PlanError:
        raise
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
    """compose(plan_cp, plan_tp, plan_ep, plan_ac, plan_fsdp) as the mesh and flags ask."""
    import torch

    from moefn.plan.compose import Stage, compose, plan_or_raise
    from moefn.plan.stages import plan_ac, plan_cp, plan_ep, plan_fsdp, plan_tp

    mesh = layout.mesh_spec
    with torch.device("meta"):
        model = _model_builder(layout)()
    stages: list[Stage] = []
    if mesh.cp > 1:
        stages.append(plan_cp(seq_len=layout.seq_len, comm=layout.cp_comm))
    if mesh.tp > 1:
        stages.append(plan_tp())
    if mesh.ep > 1:
        stages.append(plan_ep(dispatch=layout.dispatch, ranks_per_node=layout.ranks_per_node))
    if layout.ac != "none":
        stages.append(plan_ac(mode=layout.ac))
    if not layout.no_fsdp:
        stages.append(plan_fsdp(precision=layout.precision,
                                reshard_after_forward=layout.reshard_after_forward,
                                offload=bool(getattr(layout, "offload", False))))
    return plan_or_raise(compose(*stages)(model, mesh))


def _micro_batch(layout: argparse.Namespace) -> tuple[int, int]:
    """(rows, seq_len): --rows × --seq-len, else one row of --tokens × cp."""
    if layout.seq_len is not None:
        return int(layout.rows), int(layout.seq_len)
    return 1, int(layout.tokens or 4096) * layout.mesh_spec.cp


def _estimate_of(plan: ShardPlan, layout: argparse.Namespace, rank: int) -> Estimate:
    """``rank``'s estimate for the micro-batch, optimizer and routing the flags give."""
    from moefn.analyse.estimate import estimate

    rows, seq_len = _micro_batch(layout)
    return estimate(plan, rank=rank, top_k=layout.top_k, optimizer=layout.optimizer,
                    seq_len=seq_len, rows=rows, imbalance=layout.imbalance)


def _peak_estimate(plan: ShardPlan, layout: argparse.Namespace) -> Estimate:
    """The estimate of the rank with the highest predicted peak (ranks 0 and the last: FSDP2
    pads every shard to shard 0's size, so only unevenly split non-FSDP parameters differ)."""
    ranks = sorted({0, layout.mesh_spec.world_size - 1})
    return max((_estimate_of(plan, layout, r) for r in ranks), key=lambda e: e.peak or 0)


def _alternatives(layout: argparse.Namespace) -> list[tuple[str, dict[str, object]]]:
    """Layouts one change away that use less memory, cheapest first: more expert parallelism,
    another AC mode, more context parallelism, CPU offload, fewer rows."""
    mesh = layout.mesh_spec
    rows, seq_len = _micro_batch(layout)
    out: list[tuple[str, dict[str, object]]] = []
    if mesh.ep > 1 or mesh.dp_shard * mesh.cp > 1:
        out.append((f"ep={mesh.ep * 2}", {"mesh_spec": attrs.evolve(mesh, ep=mesh.ep * 2)}))
    for mode in ("selective", "router", "full"):
        if mode != layout.ac:
            out.append((f"ac={mode}", {"ac": mode}))
    if mesh.dp_shard % 2 == 0:
        cp_mesh = attrs.evolve(mesh, dp_shard=mesh.dp_shard // 2, cp=mesh.cp * 2)
        out.append((f"cp={cp_mesh.cp} (dp_shard={cp_mesh.dp_shard})",
                    {"mesh_spec": cp_mesh, "seq_len": seq_len, "rows": rows, "tokens": None}))
    if not layout.no_fsdp and not getattr(layout, "offload", False):
        out.append(("offload (FSDP CPU offload)", {"offload": True}))
    if rows > 1:
        out.append((f"rows={rows // 2}", {"rows": rows // 2, "seq_len": seq_len,
                                          "tokens": None}))
    return out


def _fit_problems(layout: argparse.Namespace, est: Estimate) -> list[dict[str, object]]:
    """The fit check of --gpu-memory: one problem when the worst rank's peak is above it."""
    from moefn.analyse.fit import Alternative, fit_problem, reserve_bytes

    if layout.gpu_memory is None or est.peak is None or est.activations is None:
        return []
    reserve = reserve_bytes(layout.reserve, layout.gpu_memory)
    if est.peak <= layout.gpu_memory - reserve:
        return []
    tried = []
    for change, options in _alternatives(layout):
        try:
            other = argparse.Namespace(**{**vars(layout), **options})
            peak = _peak_estimate(_build_plan(other), other).peak
        except PlanError:
            continue
        if peak is not None:
            tried.append(Alternative(change=change, peak=peak))
    parts = {**_state_parts(est), **dict(est.activations.parts)}
    problem = fit_problem(est.peak, est.rank, parts, layout.gpu_memory, reserve, tried)
    return [] if problem is None else [{"path": problem.path, "count": 1, "paths": [problem.path],
                                        "message": problem.message, "value": problem.value,
                                        "fix": problem.fix}]


def _state_parts(est: Estimate) -> dict[str, int]:
    """Parameters, gradients and optimizer states (all on the device unless offloaded)."""
    m = est.memory
    if m.offloaded:
        return {"sharded state on the device": m.total - m.offloaded}
    return {"params": sum(v for _, v in m.params), "grads": sum(v for _, v in m.grads),
            "optimizer states": sum(v for _, v in m.optimizer)}


def _usage_problem(layout: argparse.Namespace) -> str | None:
    """What makes this layout a usage error (exit 2), if anything."""
    if layout.seq_len is not None and layout.tokens is not None:
        return "give --tokens or --seq-len (with --rows), not both"
    if layout.mesh_spec.cp > 1 and layout.seq_len is None:
        return (f"cp={layout.mesh_spec.cp} composes plan_cp, which needs the sequence length: "
                "add --seq-len (or seq_len=... on a --compare side)")
    return _nodes_problem(layout.dispatch, layout.ranks_per_node, layout.mesh_spec.ep)


def _nodes_problem(dispatch: str, ranks_per_node: int | None, ep: int) -> str | None:
    """--ranks-per-node is given with --dispatch hierarchical, and only then, and divides ep."""
    from moefn.plan.mesh import divisors

    fix = f"use --ranks-per-node in {divisors(ep)} (GPUs per node, dividing ep={ep})"
    if dispatch != "hierarchical":
        return None if ranks_per_node is None else (
            f"--ranks-per-node {ranks_per_node} applies to --dispatch hierarchical only "
            f"(got --dispatch {dispatch}): add --dispatch hierarchical or leave "
            "--ranks-per-node out")
    if ranks_per_node is None:
        return (f"--dispatch hierarchical needs --ranks-per-node (ranks_per_node=... on a "
                f"--compare side): {fix}")
    if ep % ranks_per_node:
        return f"--ranks-per-node {ranks_per_node} does not divide ep={ep}: {fix}"
    return None


def _compare_command(args: argparse.Namespace) -> int:
    from moefn.analyse.render import render_comparison
    from moefn.plan.mesh import MeshSpec

    try:
        layouts = [_layout(args, MeshSpec.parse(mesh), options) for mesh, options in args.compare]
        usage = next(filter(None, map(_usage_problem, layouts)), None)
        if usage:
            print(f"moefn plan: {usage}", file=sys.stderr)
            return 2
        a, b = map(_build_plan, layouts)
        print(render_comparison(a, b, (_estimate_of(a, layouts[0], 0),
                                       _estimate_of(b, layouts[1], 0))))
    except PlanError as err:
        print(err)
        return 1
    return 0


def _plan_command(args: argparse.Namespace) -> int:
    if args.compare:
        return _compare_command(args)
    if args.search:
        from moefn.search_cli import search_command

        return search_command(args, _model_builder)
    from moefn.analyse.activations import hidden_dtype
    from moefn.analyse.cp_memory import cp_kv_bytes
    from moefn.analyse.layout import param_layouts
    from moefn.analyse.render import diff, format_bytes
    from moefn.plan.dtypes import DTYPE_BYTES
    from moefn.plan.mesh import MeshSpec
    from moefn.plan.serialize import to_json

    problems: list[dict[str, object]] = []
    steps: list[object] = []
    shapes: dict[str, list[object]] = {}
    memory: dict[str, object] = {}
    simulated: list[dict[str, object]] = []
    comm: list[dict[str, object]] = []
    text = ""
    world = tokens = owned = 0
    try:
        mesh = MeshSpec.parse(args.mesh)
        world = mesh.world_size
        layout = _layout(args, mesh)
        usage = _usage_problem(layout)
        if usage:
            print(f"moefn plan: {usage}", file=sys.stderr)
            return 2
        plan = _build_plan(layout)
        steps = json.loads(to_json(plan))["plan"]["steps"]
        shapes = {name: [{"shape": list(shape), "ranks": ranks}
                         for shape, ranks in layout.local_shapes(mesh)]
                  for name, layout in param_layouts(plan).items()}
        tokens = _tokens_per_rank(layout)
        owned = tokens // mesh.tp  # a tp group reads one sequence, each rank owns 1/tp of it
        est = _peak_estimate(plan, layout)
        kv_held = cp_kv_bytes(plan, tokens, DTYPE_BYTES[hidden_dtype(plan)])
        memory = {"rank": est.rank, "params": dict(est.memory.params), "grads": dict(est.memory.grads),
                  "optimizer": dict(est.memory.optimizer), "optimizer_name": args.optimizer,
                  "dtypes": dict(est.memory.dtypes),
                  "total": est.memory.total,
                  "gathered_peak": est.memory.gathered_peak,
                  "peak": est.peak, "peak_rank": est.rank,
                  "activations": dict(est.activations.parts) if est.activations else {},
                  "cp_kv_bytes": kv_held}
        comm = [attrs.asdict(c) for c in est.comm]
        memory_text = _memory_table(est, args.optimizer)
        if kv_held:
            memory_text += (f"\ncp K/V held per attention ({layout.cp_comm}): "
                            f"{format_bytes(kv_held)}")
        text = "\n".join([diff(plan), "", memory_text, "",
                          _activation_table(est, layout), "", _comm_table(est)])
        problems = _fit_problems(layout, est)
        if problems:
            text += "\n\n" + "\n".join(f"{p['path'] or '(model)'}: {p['message']} (value: "
                                      f"{p['value']}) -- fix: {p['fix']}" for p in problems)
        if args.simulate or args.simulate_ranks:
            from moefn.realize.simulate import simulate

            say = None if args.json else (lambda line: print(line, file=sys.stderr, flush=True))
            for r in simulate(plan, _model_builder(args), ranks=args.simulate_ranks,
                              progress=say):
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
        print(json.dumps({"world_size": world, "tokens_per_rank": owned, "steps": steps,
                          "problems": problems,
                          "local_shapes": shapes, "memory": memory, "comm": comm,
                          "simulated": simulated}))
    else:
        print(text)
    return 1 if problems else 0


def _demo_command(args: argparse.Namespace) -> int:
    from moefn.demo import DemoOptions, demo_mesh, run_demo

    usage = _nodes_problem(args.dispatch, args.ranks_per_node, demo_mesh(args.nproc).ep)
    if usage:
        print(f"moefn demo: {usage}", file=sys.stderr)
        return 2
    options = DemoOptions(nproc=args.nproc, steps=args.steps, dispatch=args.dispatch,
                          ranks_per_node=args.ranks_per_node,
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
    if args.command == "calibrate":
        from moefn.calibrate import main as calibrate

        profile = calibrate(args.out, args.nproc)
        flops = ", ".join(f"{k} {v / 1e9:.1f} GFLOP/s"
                          for k, v in profile["matmul_flops_per_s"].items())
        print(f"wrote {args.out}: matmul {flops}; per op {profile['op_overhead_s'] * 1e6:.1f} µs;"
              + "".join(f" {op} {link['latency_s'] * 1e6:.0f} µs + "
                        f"{link['bandwidth_bytes_per_s'] / 1e9:.2f} GB/s;"
                        for op, link in profile["intra_node"].items()))
        return 0
    return _demo_command(args)


if __name__ == "__main__":
    sys.exit(main())
