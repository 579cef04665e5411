"""Where a step's time goes, moefn next to transformers: the torch profiler on rank 0 of the
peer benchmark's setup (3 profiled steps after 3 warm-up steps, top ops by self CPU time).

>>> python -m benchmarks.profile_peer                      # doctest: +SKIP
"""

from __future__ import annotations

import os
import tempfile

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks import peer
from moefn import MeshSpec
from moefn.adapters.reference import causal_lm_loss
from moefn.launch import run_local
from moefn.train.loop import local_batch


def _profile_rank(rank: int, world: int, path: str, system: str) -> str | None:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    model = peer._load(path, system)
    batch = peer._batch()
    mine = local_batch(batch, MeshSpec(dp_shard=peer.FSDP), rank)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.25)
    scale = float(peer.FSDP) if system == "transformers" else 1.0

    def step() -> None:
        optimizer.zero_grad()
        logits = model(input_ids=mine.input_ids, position_ids=mine.position_ids,
                       use_cache=False).logits
        (causal_lm_loss((logits,), mine.labels, batch.num_valid) * scale).backward()
        optimizer.step()

    for _ in range(3):
        step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            step()
    if rank != 0:
        return None
    table: str = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15,
                                           max_name_column_width=50)
    return table


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as root:
        model_path = os.path.join(root, "qwen3-moe")
        run_local(1, peer._save, model_path)
        for name in ("transformers", "moefn all_to_all"):
            print(f"===== {name}\n{run_local(peer.NPROC, _profile_rank, model_path, name)[0]}")
