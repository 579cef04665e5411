"""Is the step-time model right here? The 8 layouts of issue 15 on 4 local gloo ranks.

``python -m benchmarks.search_calibration [--steps N]`` (nox session ``search_calibration``):
calibrates this machine (`moefn.calibrate`, microbenchmarks only, nothing fitted to these
layouts), predicts each layout's step time with `moefn.search.exact` on that profile, trains
it (the ``small`` preset, SGD, fp32, 8 rows of 128 tokens per step) and compares the
predicted with the median measured step. Writes results/search_calibration.json and the table
in docs/search_calibration.md, with the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

import torch

from benchmarks.run import timed_steps
from moefn import MeshSpec, compose
from moefn.adapters.reference import MoETransformer, get_preset
from moefn.analyse.steptime import HardwareProfile
from moefn.calibrate import calibrate
from moefn.launch import run_local
from moefn.realize import build_device_meshes, realize
from moefn.search import Layout, Request, exact, stages, summarise
from moefn.train.loop import global_batch, local_batch

ROOT = Path(__file__).parents[1]
SEQ, ROWS = 128, 8
LAYOUTS: list[tuple[str, str, str, str, bool]] = [  # name, mesh, dispatch, ac, reshard
    ("ep 1", "dp_shard=4", "none", "none", True),
    ("ep 2 all_to_all", "dp_shard=4,ep=2", "all_to_all", "none", True),
    ("ep 4 all_to_all", "dp_shard=4,ep=4", "all_to_all", "none", True),
    ("ep 2 all_gather", "dp_shard=4,ep=2", "all_gather", "none", True),
    ("cp 2 × ep 2", "dp_shard=2,cp=2,ep=2", "all_to_all", "none", True),
    ("ep 2, AC full", "dp_shard=4,ep=2", "all_to_all", "full", True),
    ("ep 2, AC selective", "dp_shard=4,ep=2", "all_to_all", "selective", True),
    ("ep 2, reshard-after-forward off", "dp_shard=4,ep=2", "all_to_all", "none", False),
]


def _layout(mesh_text: str, dispatch: str, ac: str, reshard: bool) -> Layout:
    mesh = MeshSpec.parse(mesh_text)
    return Layout(mesh=mesh, dispatch=dispatch, ac=ac, reshard=reshard,  # type: ignore[arg-type]
                  rows=ROWS // mesh.dp_shard, micro_batches=1)


def _train(rank: int, world: int, layout: Layout, steps: int) -> float:
    torch.manual_seed(0)
    model = MoETransformer(get_preset("small"))
    plan = compose(*stages(layout, SEQ, "fp32"))(model, layout.mesh).unwrap()
    realize(plan, model, build_device_meshes(layout.mesh, "cpu"))
    batch = global_batch(model.config, ROWS, SEQ, 0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    median, _ = timed_steps(model, optimizer, local_batch(batch, layout.mesh, rank),
                            batch.num_valid, steps)
    return median


def _spearman(a: list[float], b: list[float]) -> float:
    def ranks(v: list[float]) -> list[int]:
        order = sorted(range(len(v)), key=v.__getitem__)
        return [order.index(i) for i in range(len(v))]
    ra, rb = ranks(a), ranks(b)
    n = len(a)
    return 1 - 6 * sum((x - y) ** 2 for x, y in zip(ra, rb, strict=True)) / (n * (n * n - 1))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args(argv)
    load_before = os.getloadavg()
    profile_json = calibrate(4)
    profile = HardwareProfile.from_json(profile_json)
    request = Request(world=4, gpus_per_node=4, gpu_memory=2**40, reserve=0, seq_len=SEQ,
                      global_batch_tokens=ROWS * SEQ, profile=profile, precision="fp32")
    with torch.device("meta"):
        meta = MoETransformer(get_preset("small"))
    m = summarise(meta, request, ("none", "selective", "router", "full"))
    rows = []
    for name, mesh, dispatch, ac, reshard in LAYOUTS:
        layout = _layout(mesh, dispatch, ac, reshard)
        predicted = exact(m, meta, request, layout).step.seconds
        measured = statistics.median(run_local(4, _train, layout, args.steps))
        rows.append({"layout": name, "mesh": mesh, "predicted_s": predicted,
                     "measured_s": measured, "error": predicted / measured - 1})
        print(f"{name:<34}{predicted:>10.4f}{measured:>10.4f}{rows[-1]['error']:>+8.0%}",
              file=sys.stderr, flush=True)
    rho = _spearman([r["predicted_s"] for r in rows], [r["measured_s"] for r in rows])
    load_after = os.getloadavg()
    within = all(abs(r["error"]) <= 0.30 for r in rows)
    out = {"layouts": rows, "spearman": rho, "within_30_percent": within,
           "load_average_before": load_before, "load_average_after": load_after,
           "profile": profile_json, "steps": args.steps}
    (ROOT / "results").mkdir(exist_ok=True)
    (ROOT / "results" / "search_calibration.json").write_text(json.dumps(out, indent=1) + "\n")
    table = ["| layout | predicted (s) | measured median (s) | error |", "|---|---:|---:|---:|"]
    table += [f"| {r['layout']} | {r['predicted_s']:.4f} | {r['measured_s']:.4f} | "
              f"{r['error']:+.0%} |" for r in rows]
    (ROOT / "docs" / "search_calibration.md").write_text(
        "# Step-time model vs measured, 4 local gloo ranks\n\n"
        "`python -m benchmarks.search_calibration` (nox -s search_calibration): the `small` "
        "preset, SGD, fp32, 8 rows × 128 tokens per step, the profile from `moefn calibrate` "
        "on the same machine just before (nothing fitted to these layouts).\n\n"
        + "\n".join(table) + f"\n\nSpearman {rho:.2f}; all within ±30 %: {within}. Load average "
        f"before {load_before[0]:.2f}, after {load_after[0]:.2f} (2 shared cores).\n\n"
        f"The profile: {profile.op_overhead_s * 1e6:.1f} µs per op, "
        f"{profile.checkpoint_op_s * 1e6:.0f} µs (full) and {profile.selective_op_s * 1e6:.0f} µs "
        f"(selective) per checkpointed forward op, {profile.op_bytes_per_s / 1e9:.1f} GB/s of op "
        f"bytes, overlap {profile.overlap:.2f}, all-to-all latency "
        f"{profile.intra_node['all_to_all'].latency_s * 1e3:.1f} ms, all-gather "
        f"{profile.intra_node['all_gather'].latency_s * 1e3:.1f} ms.\n")
    print(json.dumps({"spearman": rho, "within_30_percent": within}))


if __name__ == "__main__":
    main()
