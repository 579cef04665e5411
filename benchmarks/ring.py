"""Ring (p2p) against all-gather context parallelism: bytes, peak memory, step time.

``python -m benchmarks.ring [--steps N] [--seq S]`` runs the small preset on 4 local CPU ranks
(CP only plus FSDP fp32, batch 8) at cp 2 and 4 with each K/V communication, and replaces the
"Ring vs all-gather" section of docs/benchmarks.md. Per step on rank 0: the bytes every
collective and point-to-point op received (`CommLedger`), the predicted K/V working set of one
attention (`moefn.analyse.cp_memory`), torch's `MemTracker` peak (activations and total), and the median
step time (steps after the first) — on a shared machine, with the load average recorded.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Any

import torch

from benchmarks.run import ROOT, _table
from moefn import MeshSpec, compose, plan_cp, plan_fsdp
from moefn.analyse.ledger import CommLedger
from moefn.analyse.cp_memory import cp_kv_bytes
from moefn.launch import run_local
from moefn.adapters.reference import MoETransformer, causal_lm_loss, get_preset
from moefn.realize import build_device_meshes, realize
from moefn.train.loop import global_batch, local_batch

TITLE = "## Ring vs all-gather context parallelism"


def _ring_rank(rank: int, world: int, cp: int, comm: str, steps: int, seq: int) -> dict[str, Any]:
    from torch.distributed._tools.mem_tracker import MemTracker

    mesh = MeshSpec.parse(f"dp_shard={world // cp},cp={cp}")
    torch.manual_seed(0)
    model = MoETransformer(get_preset("small"))
    plan = compose(plan_cp(seq_len=seq, comm=comm),  # type: ignore[arg-type]
                   plan_fsdp(precision="fp32"))(model, mesh).unwrap()
    realize(plan, model, build_device_meshes(mesh, "cpu"))
    batch = global_batch(model.config, 8, seq, 0)
    mine = local_batch(batch, mesh, rank)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    times, by_kind, peak_act, peak_total = [], {}, 0, 0
    for step in range(steps):
        ledger, tracker = CommLedger(), MemTracker()
        tracker.track_external(model, optimizer)
        start = time.perf_counter()
        with ledger, tracker:
            optimizer.zero_grad()
            loss = causal_lm_loss(model(mine.input_ids, mine.position_ids), mine.labels,
                                  batch.num_valid)
            loss.backward()
            optimizer.step()
        times.append(time.perf_counter() - start)
        if step == 1:
            by_kind = {kind: t.received for kind, t in ledger.by_kind().items()}
            snapshot = tracker.get_tracker_snapshot("peak")
            peak_act = max(sum(v for k, v in stats.items() if getattr(k, "name", "") == "ACT")
                           for stats in snapshot.values())
            peak_total = max(stats.get("Total", 0) for stats in snapshot.values())
    return {"received": by_kind, "peak_act": peak_act, "peak_total": peak_total,
            "median_s": statistics.median(times[1:]),
            "kv_predicted": cp_kv_bytes(plan, mine.input_ids.numel(), 4)}


def bench_ring(steps: int, seq: int) -> list[dict[str, Any]]:
    rows = []
    for cp in (2, 4):
        for comm in ("all_gather", "p2p"):
            result = run_local(4, _ring_rank, cp, comm, steps, seq)[0]
            received = result["received"]
            rows.append({
                "cp": cp, "comm": comm,
                "received_bytes_rank0": sum(received.values()),
                "by_kind": ", ".join(f"{k} {v}" for k, v in sorted(received.items())),
                "kv_per_attention_predicted": result["kv_predicted"],
                "peak_activation_bytes": result["peak_act"],
                "peak_total_bytes": result["peak_total"], "median_step_s": result["median_s"]})
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--seq", type=int, default=512)
    args = parser.parse_args(argv)
    load_before = os.getloadavg()
    rows = bench_ring(args.steps, args.seq)
    section = (
        f"{TITLE} (small preset, batch 8 × seq {args.seq}, 4 CPU ranks: dp_shard × cp, FSDP "
        "fp32; rank 0, step 2 of "
        f"{args.steps}: bytes received by kind (CommLedger), the predicted K/V working set of "
        "one attention (moefn.analyse.cp_memory), MemTracker peaks; median step time of steps 2.., "
        f"measured under the shared CPU lock, load average {load_before} before and "
        f"{os.getloadavg()} after — shared 2-core machine)\n\n"
        + _table(rows, ["cp", "comm", "received_bytes_rank0", "by_kind",
                        "kv_per_attention_predicted", "peak_activation_bytes",
                        "peak_total_bytes", "median_step_s"]))
    path = ROOT / "docs" / "benchmarks.md"
    text = path.read_text()
    start = text.find(TITLE)
    if start >= 0:
        end = text.find("\n## ", start + 1)
        text = text[:start] + section + ("\n" + text[end:] if end >= 0 else "\n")
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.write_text(text)
    print(section)


if __name__ == "__main__":
    main()
