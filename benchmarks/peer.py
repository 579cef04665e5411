"""moefn next to transformers' own ``DistributedConfig`` (FSDP2 + expert parallel) on one model.

The same transformers Qwen3-MoE model (hidden 256, 4 MoE layers, 16 experts, top-2, fp32,
SDPA), saved once and loaded by every system, so all start from identical weights. One fixed
global batch of 8 × 128 tokens split over the data-parallel ranks, 12 steps; the loss is the
cross-entropy summed over the global batch divided by its token count, at ep 2 and ep 4.
Systems run one after another in the same invocation on forked gloo ranks (threads per rank =
max(1, cores // nproc)):

- ``transformers``: ``from_pretrained(..., distributed_config=DistributedConfig(fsdp_size=4,
  ep_size=ep, ep_implementation="all_to_all"))``;
- ``moefn all_to_all``: ``plan_ep`` + ``plan_fsdp(precision="fp32")``
  on the unmodified model from ``from_pretrained`` (dp_shard=4, ep=ep);
- ``one process``: the same model and batch, no parallelism (the loss reference).

Each rank's loss is its token sum over the global token count; transformers averages gradients
over its FSDP ranks, so its backward is scaled by ``fsdp_size`` to get the same gradients.
Per system: median step time over steps 3–12 (zero_grad, forward, backward, optimizer step,
loss all-reduce; the median of 3 rounds that alternate the systems), losses against one
process for SGD (lr 0.25) and AdamW (lr 1e-3), and the collectives of one step counted at the
process-group level (`moefn.analyse.ledger.CommLedger`: bytes received per collective).

>>> rows = bench_peer(steps=12)            # doctest: +SKIP
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from contextlib import nullcontext
from typing import Any

import attrs
import torch
import torch.distributed as dist
from torch import nn

from moefn import MeshSpec, compose, plan_ep, plan_fsdp
from moefn.adapters.reference import causal_lm_loss, next_token_labels
from moefn.analyse.ledger import CommLedger
from moefn.launch import run_local
from moefn.realize import build_device_meshes, realize
from moefn.train.loop import Batch, local_batch

NPROC, FSDP, EPS = 4, 4, (2, 4)
SYSTEMS = ("transformers", "moefn all_to_all")
ROWS, SEQ, VOCAB = 8, 128, 1024
OPTIMIZERS = {"sgd": lambda p: torch.optim.SGD(p, lr=0.25),
              "adamw": lambda p: torch.optim.AdamW(p, lr=1e-3)}


def _config() -> Any:
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(vocab_size=VOCAB, hidden_size=256, num_hidden_layers=4, num_experts=16,
                          num_experts_per_tok=2, moe_intermediate_size=128, intermediate_size=512,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                          tie_word_embeddings=False, mlp_only_layers=[], decoder_sparse_step=1)


def save_model(path: str) -> None:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(_config(), dtype=torch.float32).save_pretrained(path)


def _batch() -> Batch:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (ROWS, SEQ), generator=generator)
    return Batch(input_ids=ids, position_ids=torch.arange(SEQ).expand(ROWS, SEQ).contiguous(),
                 labels=next_token_labels(ids))


def _load(path: str, system: str, ep: int) -> nn.Module:
    from transformers import AutoModelForCausalLM
    from transformers.distributed import DistributedConfig

    kwargs: dict[str, Any] = {"dtype": torch.float32, "attn_implementation": "sdpa"}
    if system == "transformers":
        kwargs["distributed_config"] = DistributedConfig(fsdp_size=FSDP, ep_size=ep,
                                                         ep_implementation="all_to_all")
    model: nn.Module = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if system.startswith("moefn"):
        mesh = MeshSpec(dp_shard=FSDP, ep=ep)
        stages = (plan_ep(dispatch=system.split()[1]), plan_fsdp(precision="fp32"))  # type: ignore[arg-type]
        realize(compose(*stages)(model, mesh).unwrap(), model, build_device_meshes(mesh, "cpu"))
    return model.train()


def _train(model: nn.Module, mine: Batch, num_valid: int, optimizer_name: str, steps: int,
           count_step: int, grad_scale: float = 1.0) -> dict[str, Any]:
    optimizer = OPTIMIZERS[optimizer_name](model.parameters())
    losses, times, comm = [], [], {}
    for step in range(steps):
        counter = CommLedger()
        start = time.perf_counter()
        with counter if step == count_step else nullcontext():
            optimizer.zero_grad()
            logits = model(input_ids=mine.input_ids, position_ids=mine.position_ids,
                           use_cache=False).logits
            loss = causal_lm_loss((logits,), mine.labels, num_valid)
            (loss * grad_scale).backward()
            optimizer.step()
            total = loss.detach().clone()
            if dist.is_initialized():
                dist.all_reduce(total)
        times.append(time.perf_counter() - start)
        losses.append(float(total))
        if step == count_step:
            comm = {k: attrs.asdict(t) for k, t in sorted(counter.by_kind().items())}
    return {"losses": losses, "median_step_s": statistics.median(times[2:]), "comm": comm}


def _rank(rank: int, world: int, path: str, system: str, optimizer: str, steps: int,
          ep: int) -> dict[str, Any]:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    model = _load(path, system, ep)
    batch = _batch()
    mine = local_batch(batch, MeshSpec(dp_shard=FSDP), rank)
    # transformers' FSDP averages gradients over its ranks; moefn's reductions are sums
    scale = float(FSDP) if system == "transformers" else 1.0
    return _train(model, mine, batch.num_valid, optimizer, steps, steps // 2, scale)


def _one_process(rank: int, world: int, path: str, optimizer: str, steps: int) -> dict[str, Any]:
    batch = _batch()
    return _train(_load(path, "one process", 1), batch, batch.num_valid, optimizer, steps, steps // 2)


def _save(rank: int, world: int, path: str) -> None:
    save_model(path)


def bench_peer(steps: int = 12, rounds: int = 3,
               eps: tuple[int, ...] = EPS) -> list[dict[str, Any]]:
    """One row per (system, dispatch, optimizer, ep): step time (median over ``rounds``
    alternating rounds of the per-run median), loss gap to one process, collectives of one
    step."""
    rows = []
    with tempfile.TemporaryDirectory() as root:
        path = os.path.join(root, "qwen3-moe")
        # every system runs in forked processes: the parent never computes, so no rank inherits
        # a used OpenMP pool
        run_local(1, _save, path)
        for optimizer in OPTIMIZERS:
            reference = run_local(1, _one_process, path, optimizer, steps)[0]
            rows.append(_row("one process", optimizer, 1, [reference], reference))
            for ep in eps:
                runs: dict[str, list[dict[str, Any]]] = {system: [] for system in SYSTEMS}
                for _ in range(rounds):
                    for system in SYSTEMS:
                        runs[system].append(
                            run_local(NPROC, _rank, path, system, optimizer, steps, ep)[0])
                rows += [_row(system, optimizer, ep, runs[system], reference)
                         for system in SYSTEMS]
    base = {(r["optimizer"], r["ep"]): r["median_step_s"] for r in rows
            if r["system"] == "transformers"}
    for row in rows:
        key = (row["optimizer"], row["ep"] if row["ep"] > 1 else eps[0])
        row["vs_transformers"] = round(row["median_step_s"] / base[key], 3)
    return rows


def _row(system: str, optimizer: str, ep: int, runs: list[dict[str, Any]],
         reference: dict[str, Any]) -> dict[str, Any]:
    comm = runs[0]["comm"]
    medians = sorted(r["median_step_s"] for r in runs)
    name, _, dispatch = system.partition(" ")
    return {
        "system": name if dispatch != "process" else system,
        "dispatch": {"process": "-", "": "all_to_all"}.get(dispatch, dispatch),
        "optimizer": optimizer, "ep": ep,
        "median_step_s": round(statistics.median(medians), 4),
        "step_s_range": f"{medians[0]:.3f}–{medians[-1]:.3f}",
        "max_loss_diff_vs_one_process": max(abs(a - b) for r in runs for a, b in zip(
            r["losses"], reference["losses"], strict=True)),
        "final_loss": round(runs[0]["losses"][-1], 6),
        "collectives_per_step_rank0": sum(c["calls"] for c in comm.values()),
        "received_bytes_per_step_rank0": sum(c["received"] for c in comm.values()),
        "all_to_all_received_bytes_rank0": comm.get("all_to_all", {}).get("received", 0),
        "by_collective": dict(comm),
    }


if __name__ == "__main__":
    for row in bench_peer():
        print(row)
