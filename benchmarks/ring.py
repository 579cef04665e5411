"""Ring (p2p) against all-gather context parallelism: bytes, peak memory, step time.

A section of ``python -m benchmarks.run`` (alone: ``python -m benchmarks.run --ring
[--steps N] [--ring-seq S]``, which replaces the "Ring vs all-gather" section of
docs/benchmarks.md). The small preset on 4 local CPU ranks (CP only plus FSDP fp32, batch 8)
at cp 2 and 4 with each K/V communication. Per step on rank 0: the bytes every collective and
point-to-point op received (`CommLedger`), the predicted K/V working set of one attention
(`moefn.analyse.cp_memory`), torch's `MemTracker` peak (activations and total), and the median
step time (steps after the first) — on a shared machine, with the load average recorded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from benchmarks.run import Watchers, _table, timed_steps, tracked_peaks
from moefn import MeshSpec, compose, plan_cp, plan_fsdp
from moefn.adapters.reference import MoETransformer, get_preset
from moefn.analyse.cp_memory import cp_kv_bytes
from moefn.analyse.ledger import CommLedger
from moefn.launch import run_local
from moefn.realize import build_device_meshes, realize
from moefn.train.loop import global_batch, local_batch

TITLE = "## Ring vs all-gather context parallelism"
KEYS = ["cp", "comm", "received_bytes_rank0", "by_kind", "kv_per_attention_predicted",
        "peak_activation_bytes", "peak_total_bytes", "median_step_s"]


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

    def watch() -> Watchers:
        tracker = MemTracker()
        tracker.track_external(model, optimizer)
        return CommLedger(), tracker

    median, watched = timed_steps(model, optimizer, mine, batch.num_valid, steps, watch)
    ledger, tracker = watched[1]
    assert isinstance(ledger, CommLedger)
    peak_act, peak_total = tracked_peaks(tracker)
    return {"received": {kind: t.received for kind, t in ledger.by_kind().items()},
            "peak_act": peak_act, "peak_total": peak_total, "median_s": median,
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


def ring_section(rows: list[dict[str, Any]], steps: int, seq: int,
                 load: tuple[tuple[float, ...], tuple[float, ...]]) -> str:
    """The docs section: its title, what was run (``load``: the load average before, after)."""
    return (f"{TITLE} (small preset, batch 8 × seq {seq}, 4 CPU ranks: dp_shard × cp, FSDP "
            f"fp32; rank 0, step 2 of {steps}: bytes received by kind (CommLedger), the "
            "predicted K/V working set of one attention (moefn.analyse.cp_memory), MemTracker "
            "peaks; median step time of steps 2.., measured under the shared CPU lock, load "
            f"average {load[0]} before and {load[1]} after — shared 2-core machine)\n\n"
            + _table(rows, KEYS))


def replace_section(path: Path, section: str) -> None:
    """Put ``section`` in place of the section of ``path`` with the same title (its heading up
    to `` (``), appended if there is none."""
    text = path.read_text()
    start = text.find(section.split("\n")[0].split(" (")[0])
    if start >= 0:
        end = text.find("\n## ", start + 1)
        text = text[:start] + section + ("\n" + text[end:] if end >= 0 else "\n")
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.write_text(text)
