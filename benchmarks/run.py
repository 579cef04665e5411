"""moefn benchmarks: vs transformers, dispatch, checkpointing, context parallel, planning, ring CP.

``python -m benchmarks.run [--steps N]`` (or ``moefn bench``) prints tables, writes
results/benchmarks.json and docs/benchmarks.md; ``--ring`` runs only the ring-vs-all-gather
section (`benchmarks.ring`, at ``--ring-seq`` tokens), ``--peer`` only the comparison with
transformers (`benchmarks.peer`), ``--profile`` only the profile of both
(`benchmarks.profile`): each replaces its section in docs/benchmarks.md and its key in
results/benchmarks.json. Targets live here, never in timed unit tests;
the machine is shared, so rounds alternate systems and we report medians, ratios and the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, ExitStack
from functools import partial
from pathlib import Path
from typing import Any

import torch
from attrs import evolve

from moefn import MeshSpec, compose, plan_ac, plan_cp, plan_ep, plan_fsdp
from moefn.adapters.reference import MoETransformer, causal_lm_loss, get_preset
from moefn.analyse.estimate import estimate
from moefn.analyse.ledger import CommLedger, Traffic
from moefn.launch import run_local
from moefn.plan.compose import Planner, Stage
from moefn.realize import build_device_meshes, realize
from moefn.train.loop import Batch, global_batch, local_batch

ROOT = Path(__file__).parents[1]
Watchers = Sequence[AbstractContextManager[Any]]


def timed_steps(model: torch.nn.Module, optimizer: torch.optim.Optimizer, mine: Batch,
                num_valid: int, steps: int,
                watch: Callable[[], Watchers] = tuple) -> tuple[float, list[Watchers]]:
    """``steps`` training steps on ``mine``, each inside fresh ``watch()`` contexts (a
    `CommLedger`, a `MemTracker`): the median time of steps 2.. and every step's contexts."""
    times, watched = [], []
    for _ in range(steps):
        watchers = watch()
        start = time.perf_counter()
        with ExitStack() as stack:
            for w in watchers:
                stack.enter_context(w)
            optimizer.zero_grad()
            loss = causal_lm_loss(model(mine.input_ids, mine.position_ids), mine.labels,
                                  num_valid)
            loss.backward()  # type: ignore[no-untyped-call]
            optimizer.step()
        times.append(time.perf_counter() - start)
        watched.append(watchers)
    return statistics.median(times[1:]), watched


def _stages(mesh: MeshSpec, dispatch: str, ac: str, seq: int) -> list[Stage]:
    stages: list[Stage] = []
    if mesh.cp > 1:
        stages.append(plan_cp(seq_len=seq))
    if mesh.ep > 1 and dispatch == "hierarchical":  # the ep group as nodes of 2 ranks
        stages.append(plan_ep(dispatch="hierarchical", ranks_per_node=2))
    elif mesh.ep > 1:
        stages.append(plan_ep(dispatch=dispatch))  # type: ignore[arg-type]
    if ac != "off":
        stages.append(plan_ac(mode=ac))  # type: ignore[arg-type]
    return [*stages, plan_fsdp(precision="fp32")]


def _train_rank(rank: int, world: int, mesh_text: str, dispatch: str, ac: str, steps: int,
                seq: int) -> dict[str, Any]:
    mesh = MeshSpec.parse(mesh_text)
    torch.manual_seed(0)
    model = MoETransformer(get_preset("small"))
    plan = compose(*_stages(mesh, dispatch, ac, seq))(model, mesh).unwrap()
    realize(plan, model, build_device_meshes(mesh, "cpu"))
    batch = global_batch(model.config, 8, seq, 0)
    mine = local_batch(batch, mesh, rank)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    median, watched = timed_steps(model, optimizer, mine, batch.num_valid, steps,
                                  lambda: (CommLedger(),))
    ledger = watched[1][0]
    assert isinstance(ledger, CommLedger)
    received = sum(t.received for t in ledger.by_kind().values())
    a2a = ledger.by_kind().get("all_to_all", Traffic()).received
    across = sum(t.received for (kind, group), t in ledger.totals().items()
                 if kind == "all_to_all" and group == (0, 2))  # nodes of 2 ranks
    predicted = estimate(plan, rank, tokens_per_rank=mine.input_ids.numel(),
                         activation_dtype="float32").comm
    ep_a2a = [c for c in predicted if c.op == "all_to_all"]
    return {"median_s": median, "received": received,
            "predicted": sum(c.received for c in predicted), "a2a_received": a2a,
            "a2a_predicted": sum(c.received for c in ep_a2a), "a2a_across_nodes": across,
            "a2a_lower_bound": sum(c.lower_bound for c in ep_a2a),
            "lower_bound": sum(c.lower_bound for c in predicted
                               if c.collective.startswith(("ep", "cp")))}


def bench_dispatch(steps: int) -> list[dict[str, Any]]:
    """Step time and what rank 0 receives per step (FSDP + EP), measured and predicted: the
    all-to-all predictions assume uniform routing (the model's is not), the all-gather one does
    not depend on it; all-to-all bytes (EP dispatch only) beside their lower bound."""
    rows = []
    for ep, dispatch in ((2, "all_to_all"), (2, "all_gather"), (4, "all_to_all"),
                         (4, "hierarchical"), (4, "all_gather")):
            _progress(f"  dispatch: ep={ep} {dispatch}")
            result = run_local(4, _train_rank, f"dp_shard=4,ep={ep}", dispatch, "off", steps, 32)
            rows.append({"ep": ep, "dispatch": dispatch, "median_step_s": result[0]["median_s"],
                         "received_bytes_rank0": result[0]["received"],
                         "predicted_bytes_rank0": result[0]["predicted"],
                         "ep_lower_bound_bytes": result[0]["lower_bound"],
                         "a2a_received_rank0": result[0]["a2a_received"],
                         "a2a_predicted_rank0": result[0]["a2a_predicted"],
                         "a2a_lower_bound_rank0": result[0]["a2a_lower_bound"],
                         "a2a_across_nodes_rank0": result[0]["a2a_across_nodes"]})
    return rows


def _ac_rank(rank: int, world: int, mode: str, steps: int) -> dict[str, Any]:
    from torch.distributed._tools.mem_tracker import MemTracker

    mesh = MeshSpec(dp_shard=1)
    torch.manual_seed(0)
    model = MoETransformer(get_preset("small"))
    stages = [plan_ac(mode=mode)] if mode != "off" else []  # type: ignore[arg-type]
    plan = compose(*stages, plan_fsdp(precision="fp32"))(model, mesh).unwrap()
    realize(plan, model, build_device_meshes(mesh, "cpu"))
    batch = global_batch(model.config, 8, 128, 0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

    def tracker() -> Watchers:
        tracker = MemTracker()
        tracker.track_external(model, optimizer)
        return (tracker,)

    median, watched = timed_steps(model, optimizer, batch, batch.num_valid, steps, tracker)
    peak, total = tracked_peaks(watched[-1][0])
    return {"peak_activation_bytes": peak, "peak_total_bytes": total, "median_s": median}


def tracked_peaks(tracker: Any) -> tuple[int, int]:
    """A `MemTracker`'s peak activation bytes and peak total, over devices."""
    snapshot = tracker.get_tracker_snapshot("peak")
    peak = max(sum(v for k, v in stats.items() if getattr(k, "name", "") == "ACT")
               for stats in snapshot.values())
    return peak, max(stats.get("Total", 0) for stats in snapshot.values())


def bench_ac(steps: int) -> list[dict[str, Any]]:
    return [{"mode": mode, **run_local(1, _ac_rank, mode, steps)[0]}
            for mode in ("off", "full", "router", "selective")]


def bench_cp(steps: int) -> list[dict[str, Any]]:
    """What rank 0 receives per step (FSDP + CP K/V), measured and predicted, and the K/V
    lower bound (gathered once in forward, gradients reduce-scattered once)."""
    rows = []
    for cp, ac in ((2, "off"), (4, "off"), (2, "router")):
        result = run_local(4, _train_rank, f"dp_shard={4 // cp},cp={cp}", "all_to_all", ac,
                           steps, 128)
        rows.append({"cp": cp, "ac": ac, "received_bytes_rank0": result[0]["received"],
                     "predicted_bytes_rank0": result[0]["predicted"],
                     "kv_lower_bound_bytes": result[0]["lower_bound"],
                     "median_step_s": result[0]["median_s"]})
    return rows


def _median_seconds(fn: Callable[[], Any], rounds: int = 3) -> float:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _plan_once(planner: Planner, model: torch.nn.Module, mesh: MeshSpec) -> None:
    planner(model, mesh).unwrap()


def bench_planning() -> list[dict[str, Any]]:
    """Plan, diff, JSON and estimate times, and one fake-world realize (rank 0), for the 671B
    preset at 256/1024/4096 ranks: a plan is symbolic, its cost must not grow with the world."""
    from moefn.analyse.estimate import estimate
    from moefn.analyse.render import diff
    from moefn.plan.serialize import to_json
    from moefn.realize.simulate import simulate

    rows = []
    config = get_preset("deepseek-v3")
    with torch.device("meta"):
        model = MoETransformer(config)
    for world, ep in ((256, 32), (1024, 64), (4096, 64)):
        _progress(f"  planning: world {world}, ep {ep} (a fake-world realize of rank 0 included)")
        mesh = MeshSpec(dp_shard=world, ep=ep)
        planner = compose(plan_ep(), plan_ac(), plan_fsdp())
        plan = planner(model, mesh).unwrap()
        rows.append({"world": world, "ep": ep, "steps": len(plan.steps),
                     "plan_s": _median_seconds(partial(_plan_once, planner, model, mesh)),
                     "diff_s": _median_seconds(partial(diff, plan)),
                     "json_s": _median_seconds(partial(to_json, plan)),
                     "estimate_s": _median_seconds(partial(estimate, plan)),
                     "simulate_rank0_s": simulate(plan, lambda: MoETransformer(config),
                                                  ranks=[0])[0].seconds})
    return rows


def bench_planning_sweep() -> list[dict[str, Any]]:
    """Pure plan time as layers and experts grow (1024 ranks, ep 64): linear in the modules."""
    rows = []
    for layers in (16, 61, 122):
        for experts in (64, 256, 1024):
            config = evolve(get_preset("deepseek-v3"), n_layers=layers, n_experts=experts)
            with torch.device("meta"):
                model = MoETransformer(config)
            planner = compose(plan_ep(), plan_ac(), plan_fsdp())
            mesh = MeshSpec(dp_shard=1024, ep=64)
            rows.append({"layers": layers, "experts": experts,
                         "plan_s": _median_seconds(partial(_plan_once, planner, model, mesh))})
    return rows


def _progress(line: str) -> None:
    """A progress line on stderr (the tables go to stdout and docs/benchmarks.md)."""
    print(line, file=sys.stderr, flush=True)


def _machine() -> dict[str, Any]:
    return {"python": platform.python_version(), "torch": torch.__version__,
            "cpus": os.cpu_count(), "load_average": os.getloadavg(),
            "platform": platform.platform()}


def _table(rows: list[dict[str, Any]], keys: list[str]) -> str:
    head = "| " + " | ".join(keys) + " |\n|" + "---|" * len(keys) + "\n"
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.1e}" if 0 < abs(v) < 1e-3 else f"{v:.4f}"
        return str(v)
    return head + "\n".join("| " + " | ".join(fmt(r[k]) for k in keys) + " |" for r in rows)


def peer_section(rows: list[dict[str, Any]]) -> str:
    """The moefn-vs-transformers table."""
    return ("## moefn vs transformers `DistributedConfig` (Qwen3-MoE, hidden 256, 4 MoE layers, "
            "16 experts top-2, fp32; 4 CPU ranks: FSDP 4 × EP 2 and 4; batch 8×128; 12 steps, "
            "median of steps 3–12, median of 3 alternating rounds; collectives and bytes of "
            "one step on rank 0)\n\n"
            + _table(rows, ["system", "dispatch", "optimizer", "ep", "median_step_s",
                            "step_s_range", "vs_transformers", "max_loss_diff_vs_one_process",
                            "collectives_per_step_rank0", "received_bytes_per_step_rank0",
                            "all_to_all_received_bytes_rank0"]))


def profile_section(rows: list[dict[str, Any]], load: tuple[Any, Any]) -> str:
    """The side-by-side profile, with the load average before and after the run."""
    from benchmarks.profile import SKEW

    systems = [k for k in rows[0] if k.endswith("_ms")]
    total = [{"category": "step (profiled wall)", "rank": rank,
              **{s: round(sum(r[s] for r in rows if r["rank"] == rank
                              and r["category"] != SKEW), 1) for s in systems}}
             for rank in sorted({r["rank"] for r in rows})]
    return ("## Where a step goes: moefn next to transformers (torch.profiler, `python -m "
            "benchmarks.run --profile`; peer setup, SGD, ep 2; ms per step of the main thread, "
            "3 steps after 3 warm-up, with_stack on, so slower than unprofiled steps; load "
            f"average {load[0]} before, {load[1]} after)\n\n"
            + _table(rows + total, ["category", "rank", *systems]))


def _only(name: str, bench: Callable[[], list[dict[str, Any]]],
          section: Callable[[list[dict[str, Any]], tuple[Any, Any]], str]) -> None:
    """Run one section, replace it in docs/benchmarks.md and its key in the results JSON."""
    from benchmarks.ring import replace_section

    before = os.getloadavg()
    rows = bench()
    text = section(rows, (before, os.getloadavg()))
    json_path = ROOT / "results" / "benchmarks.json"
    results = json.loads(json_path.read_text()) if json_path.exists() else {}
    results[name] = rows
    results[f"{name}_load_average"] = [before, os.getloadavg()]
    json_path.parent.mkdir(exist_ok=True)
    json_path.write_text(json.dumps(results, indent=1) + "\n")
    replace_section(ROOT / "docs" / "benchmarks.md", text)
    print(text)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--ring", action="store_true",
                        help="run only the ring-vs-all-gather section and replace it in place")
    parser.add_argument("--ring-seq", type=int, default=512,
                        help="sequence length of the ring section (default 512)")
    parser.add_argument("--peer", action="store_true",
                        help="run only the comparison with transformers, replace it in place")
    parser.add_argument("--profile", action="store_true",
                        help="run only the side-by-side profile, replace it in place")
    args = parser.parse_args(argv)
    from benchmarks.peer import bench_peer
    from benchmarks.profile import profile_peer
    from benchmarks.ring import bench_ring, replace_section, ring_section

    def ring() -> tuple[list[dict[str, Any]], str]:
        before = os.getloadavg()
        rows = bench_ring(args.steps, args.ring_seq)
        return rows, ring_section(rows, args.steps, args.ring_seq, (before, os.getloadavg()))

    if args.peer:
        _only("peer", bench_peer, lambda rows, load: peer_section(rows) + "\n\nLoad average "
              f"{load[0]} before, {load[1]} after.")
    if args.profile:
        _only("profile", profile_peer, profile_section)
    if args.peer or args.profile:
        return
    if args.ring:
        section = ring()[1]
        replace_section(ROOT / "docs" / "benchmarks.md", section)
        print(section)
        return
    machine = _machine()
    benches: dict[str, Callable[[], list[dict[str, Any]]]] = {
        "peer": bench_peer, "dispatch": partial(bench_dispatch, args.steps),
        "ac": partial(bench_ac, args.steps), "cp": partial(bench_cp, args.steps),
        "planning": bench_planning, "planning_sweep": bench_planning_sweep,
        "profile": profile_peer}
    sections: dict[str, str] = {}

    def ring_rows() -> list[dict[str, Any]]:
        rows, sections["ring"] = ring()
        return rows

    benches["ring"] = ring_rows
    results: dict[str, Any] = {"machine": machine}
    for i, (name, bench) in enumerate(benches.items()):
        _progress(f"[{i + 1}/{len(benches)}] {name} ...")
        start = time.perf_counter()
        results[name] = bench()
        _progress(f"[{i + 1}/{len(benches)}] {name}: {len(results[name])} rows in "
                  f"{time.perf_counter() - start:.0f} s")
    machine["load_average_after"] = os.getloadavg()
    (ROOT / "results").mkdir(exist_ok=True)
    (ROOT / "results" / "benchmarks.json").write_text(json.dumps(results, indent=1))
    text = "\n\n".join([
        "# moefn benchmarks\n\nGenerated by `python -m benchmarks.run` (`nox -s bench`). "
        f"Machine: {machine}.",
        peer_section(results["peer"]),
        "## Token dispatch (small preset, 4 CPU ranks, dp_shard=4, FSDP fp32; bytes received per "
        "step on rank 0, all collectives: measured with CommLedger, predicted by estimate)\n\n"
        + _table(results["dispatch"], ["ep", "dispatch", "median_step_s", "received_bytes_rank0",
                                       "predicted_bytes_rank0", "ep_lower_bound_bytes",
                                       "a2a_received_rank0", "a2a_predicted_rank0",
                                       "a2a_lower_bound_rank0", "a2a_across_nodes_rank0"]),
        "## Activation checkpointing (small preset, batch 8×128, one rank; MemTracker peak)\n\n"
        + _table(results["ac"], ["mode", "peak_activation_bytes", "peak_total_bytes",
                                 "median_s"]),
        "## Context parallel (small preset, seq 128, 4 ranks, FSDP fp32; bytes received per step "
        "on rank 0, all collectives)\n\n"
        + _table(results["cp"], ["cp", "ac", "received_bytes_rank0", "predicted_bytes_rank0",
                                 "kv_lower_bound_bytes", "median_step_s"]),
        "## Planning the DeepSeek-V3-like preset on the meta device (EP + AC + FSDP)\n\n"
        + _table(results["planning"], ["world", "ep", "steps", "plan_s", "diff_s", "json_s",
                                       "estimate_s", "simulate_rank0_s"]),
        "## Plan time as the model grows (1024 ranks, ep 64)\n\n"
        + _table(results["planning_sweep"], ["layers", "experts", "plan_s"]),
        sections["ring"],
        profile_section(results["profile"], (machine["load_average"],
                                             machine["load_average_after"])),
    ])
    (ROOT / "docs" / "benchmarks.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
