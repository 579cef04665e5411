"""``moefn plan --search``: the layout search's command line (text or ``--json``)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

import attrs
from torch import nn

from moefn.analyse.fit import reserve_bytes
from moefn.analyse.render import format_bytes
from moefn.plan.errors import PlanError
from moefn.search import NOT_SEARCHED, Layout, Request, Result, Scored, search


def _usage(args: argparse.Namespace) -> str | None:
    missing = [flag for flag, value in (("--world", args.world), ("--gpu-memory", args.gpu_memory),
                                        ("--seq-len", args.seq_len),
                                        ("--global-batch-tokens", args.global_batch_tokens))
               if value is None]
    if missing:
        return f"--search needs {', '.join(missing)}"
    if args.global_batch_tokens % args.seq_len:
        return (f"--global-batch-tokens {args.global_batch_tokens} is not a whole number of "
                f"--seq-len {args.seq_len} sequences: use a multiple of {args.seq_len}")
    return None


def argv(args: argparse.Namespace, layout: Layout) -> list[str]:
    """The `moefn plan` arguments that plan ``layout`` again."""
    source = ["--hf-config", args.hf_config] if args.hf_config else ["--model", args.model]
    extra = ["--imbalance", str(args.imbalance)] if args.imbalance != 1.0 else []
    return ["plan", *source, *layout.argv(args.seq_len), *extra]


def _row(args: argparse.Namespace, s: Scored) -> dict[str, Any]:
    return {"mesh": s.layout.mesh.as_text(), "argv": argv(args, s.layout),
            "dispatch": s.layout.dispatch, "ac": s.layout.ac,
            "reshard_after_forward": s.layout.reshard, "rows": s.layout.rows,
            "micro_batches": s.layout.micro_batches, "peak_bytes": s.peak,
            "step_time_s": s.step.seconds, "tokens_per_s_per_gpu": s.tokens_per_s_per_gpu,
            "bytes_intra_node": s.step.bytes_intra_node,
            "bytes_inter_node": s.step.bytes_inter_node, "compute_s": s.step.compute_s,
            "exposed_comm_s": s.step.exposed_s, "overlapped_comm_s": s.step.overlapped_s}


def _text(args: argparse.Namespace, result: Result, request: Request) -> str:
    p = request.profile
    lines = [f"layout search: {result.searched} layouts scored on {p.name} "
             f"({'calibrated' if p.calibrated else 'uncalibrated vendor figures'}), "
             f"{args.world} ranks, {request.gpus_per_node} per node"]
    for i, c in enumerate(result.layouts, 1):
        s = c.exact
        lines += [f"{i}. {s.layout.mesh.as_text()} dispatch={s.layout.dispatch} "
                  f"ac={s.layout.ac} reshard_after_forward={s.layout.reshard} "
                  f"rows={s.layout.rows} micro-batches={s.layout.micro_batches}",
                  f"   step {s.step.seconds:.3f} s ({s.tokens_per_s_per_gpu:,.0f} tokens/s/GPU; "
                  f"compute {s.step.compute_s:.3f} s, exposed comm "
                  + ", ".join(f"{k} {v:.3f} s" for k, v in s.step.exposed_s.items())
                  + f"), peak {format_bytes(s.peak)}, "
                  f"{format_bytes(s.step.bytes_intra_node)} in / "
                  f"{format_bytes(s.step.bytes_inter_node)} across nodes",
                  f"   moefn {' '.join(argv(args, s.layout))}",
                  "   closed form vs plan: " + ", ".join(f"{k} {v:+.4g}"
                                                         for k, v in c.difference().items())]
    if not result.layouts:
        lines.append("nothing fits; closest:")
        lines += [f"  {s.layout.mesh.as_text()} ac={s.layout.ac} rows={s.layout.rows}: peak "
                  f"{format_bytes(s.peak)} (binding term: "
                  f"{max(s.parts, key=s.parts.__getitem__)})" for s in result.closest]
    lines.append("rejected: " + ", ".join(f"{k}: {v}" for k, v in sorted(result.rejected.items())))
    lines.append(f"not searched: {', '.join(NOT_SEARCHED)}")
    return "\n".join(lines)


def search_command(args: argparse.Namespace, builder: Callable[[argparse.Namespace],
                                                                Callable[[], nn.Module]]) -> int:
    import torch

    from moefn.analyse.steptime import load_profile

    usage = _usage(args)
    if usage:
        print(f"moefn plan: {usage}", file=sys.stderr)
        return 2
    say = None if args.json else (lambda line: print(line, file=sys.stderr, flush=True))
    try:
        request = Request(world=args.world, gpus_per_node=args.gpus_per_node,
                          gpu_memory=args.gpu_memory,
                          reserve=reserve_bytes(args.reserve, args.gpu_memory),
                          seq_len=args.seq_len, global_batch_tokens=args.global_batch_tokens,
                          profile=load_profile(args.hardware), imbalance=args.imbalance,
                          top=args.top)
        with torch.device("meta"):
            model = builder(args)()
        result = search(model, request, say)
    except PlanError as err:
        print(str(err) if not args.json else json.dumps({"problems": [
            attrs.asdict(p) for p in err.problems]}))
        return 1
    if args.json:
        print(json.dumps({
            "hardware": {"name": request.profile.name, "calibrated": request.profile.calibrated},
            "layouts": [{**_row(args, c.exact), "closed_form": _row(args, c.closed),
                         "difference": c.difference()} for c in result.layouts],
            "closest": [{**_row(args, s), "binding": max(s.parts, key=s.parts.__getitem__)}
                        for s in result.closest],
            "rejected": result.rejected, "searched": result.searched,
            "not_searched": list(NOT_SEARCHED)}))
    else:
        print(_text(args, result, request))
    return 0 if result.layouts else 1
