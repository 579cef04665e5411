"""Measure one training step's peak memory on real gloo ranks with torch's FSDPMemTracker.

A case is a preset (a `moefn.adapters.reference` preset name, or ``hf:<family>`` for a tiny
transformers model), a mesh and stage options (``cp_comm``: CP's K/V all-gathered or passed
around the ring). Each rank builds the model in fp32 or bf16, plans and realizes it, forces
balanced routing (token ``i``'s ``j``-th choice is expert ``(i·k + j) mod E``, so every expert
and every EP rank receives exactly ``T·k/E`` rows per expert), runs one untracked step
(gradients then exist and are zeroed in place, as the estimate assumes), and tracks the next
one: forward, cross-entropy, backward and an SGD step. The tracker's ``peak`` total is what the
rank's tensors occupy at their worst moment.

>>> run_case(rank, world, Case(preset="tiny-act", mesh="dp_shard=4", ac="none"))  # doctest: +SKIP
"""

from __future__ import annotations

from contextlib import ExitStack, nullcontext
from typing import Any
from unittest import mock

import attrs
import torch
from attrs import frozen
from torch import Tensor
from torch.distributed.tensor.parallel import loss_parallel

from moefn import MeshSpec, compose, plan_ac, plan_cp, plan_ep, plan_fsdp, plan_tp
from moefn.adapters.reference import MoETransformer, causal_lm_loss
from moefn.adapters.reference.config import MoEConfig
from moefn.adapters.reference.presets import get_preset
from moefn.plan.compose import Stage
from moefn.plan.records import ShardPlan

# reference-model shapes where activations dominate at a few hundred tokens per rank
PRESETS: dict[str, MoEConfig] = {
    "tiny-act": attrs.evolve(get_preset("tiny"), hidden=64, head_dim=16, vocab_size=512,
                             moe_intermediate=64, n_layers=2),
    "tiny-act-mla": attrs.evolve(get_preset("tiny-mla"), hidden=64, vocab_size=512,
                                 moe_intermediate=64),
    # 6 query heads over 3 K/V heads: replicated K/V projections at tp=2
    "tiny-act-kv3": attrs.evolve(get_preset("tiny-kv3"), hidden=64, head_dim=16, vocab_size=512,
                                 moe_intermediate=64, n_layers=2),
}


@frozen(kw_only=True)
class Case:
    preset: str
    mesh: str
    ac: str = "none"
    dispatch: str = "all_to_all"
    rows: int = 2
    seq_len: int = 256
    precision: str = "fp32"
    cp_comm: str = "all_gather"

    def stages(self) -> list[Stage]:
        mesh = MeshSpec.parse(self.mesh)
        out: list[Stage] = []
        if mesh.cp > 1:
            out.append(plan_cp(seq_len=self.seq_len, comm=self.cp_comm))  # type: ignore[arg-type]
        if mesh.tp > 1:
            out.append(plan_tp())
        if mesh.ep > 1:
            out.append(plan_ep(dispatch=self.dispatch))  # type: ignore[arg-type]
        if self.ac != "none":
            out.append(plan_ac(mode=self.ac))  # type: ignore[arg-type]
        out.append(plan_fsdp(precision=self.precision))  # type: ignore[arg-type]
        return out


HF_PREFIX = "hf:"  # ``hf:qwen3_moe``: tests.hf_parity's tiny config, hidden 64, vocab 512


def build_plan(case: Case, model: torch.nn.Module) -> ShardPlan:
    return compose(*case.stages())(model, MeshSpec.parse(case.mesh)).unwrap()


def _model(case: Case, device: str | None = None) -> torch.nn.Module:
    if case.preset.startswith(HF_PREFIX):
        from tests import hf_parity

        with mock.patch.dict(hf_parity._COMMON, hidden_size=64, vocab_size=512):
            return hf_parity.build_hf(case.preset.removeprefix(HF_PREFIX), device=device)
    if device is None:
        return MoETransformer(PRESETS[case.preset])
    with torch.device(device):
        return MoETransformer(PRESETS[case.preset])


def meta_plan(case: Case) -> ShardPlan:
    return build_plan(case, _model(case, "meta"))


def _vocab(model: torch.nn.Module) -> int:
    return int(model.config.vocab_size)  # both the reference model and transformers have it


def _logits(model: torch.nn.Module, ids: Tensor, pos: Tensor) -> tuple[Tensor, ...]:
    if isinstance(model, MoETransformer):
        return model(ids, pos)
    return (model(input_ids=ids, position_ids=pos, use_cache=False).logits,)


def _balanced_route(choice: Tensor, top_k: int) -> Tensor:
    """Token ``i``'s ``j``-th expert is ``(i·k + j) mod E``: every expert gets the same rows."""
    tokens, experts = choice.shape
    slots = torch.arange(tokens * top_k, device=choice.device).view(tokens, top_k)
    return slots % experts


_TOPK = torch.topk


def _balanced_topk(scores: Tensor, k: int, dim: int = -1, *args: Any, **kwargs: Any) -> Any:
    """transformers' routers call ``torch.topk`` on ``[T, E]`` scores: the balanced choice, with
    the scores at those experts as values (gradients flow as through topk)."""
    if scores.dim() != 2 or dim not in (-1, 1):
        return _TOPK(scores, k, dim, *args, **kwargs)
    index = _balanced_route(scores, k)
    return torch.return_types.topk((scores.gather(-1, index), index))


def run_case(rank: int, world: int, case: Case) -> dict[str, int]:
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker

    from moefn.realize import build_device_meshes, realize
    from moefn.realize.context_parallel import shard_sequence

    torch.manual_seed(0)
    model = _model(case)
    plan = build_plan(case, model)
    mesh = plan.mesh
    realize(plan, model, build_device_meshes(mesh, "cpu"))
    generator = torch.Generator().manual_seed(rank // mesh.tp)  # a tp group reads one sequence
    ids = torch.randint(0, _vocab(model), (case.rows, case.seq_len), generator=generator)
    pos = torch.arange(case.seq_len).expand(case.rows, case.seq_len).contiguous()
    if mesh.cp > 1:
        cp_rank = mesh.coordinate(rank, "cp")
        ids, pos = (shard_sequence(t, mesh.cp, cp_rank) for t in (ids, pos))
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    with ExitStack() as stack:
        stack.enter_context(mock.patch("moefn.adapters.reference.moe.route", _balanced_route))
        if not isinstance(model, MoETransformer):
            stack.enter_context(mock.patch("torch.topk", _balanced_topk))

        def step() -> None:
            outputs = _logits(model, ids, pos)  # kept, as a training loop's variable keeps them
            with loss_parallel() if mesh.tp > 1 else nullcontext():  # vocabulary-sharded logits
                causal_lm_loss(outputs, ids, ids.numel()).backward()  # type: ignore[no-untyped-call]
            optimizer.step()
            optimizer.zero_grad(set_to_none=False)
            del outputs

        step()
        tracker = FSDPMemTracker(model, optimizer)
        tracker.track_inputs((ids, pos))
        with tracker:
            step()
        peak = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]
    return {"peak": int(peak["Total"]),
            **{str(getattr(k, "value", k)): int(v) for k, v in peak.items() if k != "Total"}}


def measure(pool: Any, cases: list[Case]) -> list[list[dict[str, int]]]:
    """Every case on ``pool`` (a `tests.ranks.RankPool`), per rank."""
    return [pool.run(run_case, case) for case in cases]


def within(measured: dict[str, int]) -> bool:
    """Whether activations (everything but the sharded state, buffers and inputs) are at least
    half the measured peak — the configurations the comparison is about."""
    state = sum(measured.get(k, 0) for k in ("Sharded Param", "Sharded Grad", "OptState",
                                             "Buffer", "Inputs"))
    return 2 * (measured["peak"] - state) >= measured["peak"]


MATRIX_MESHES = {(1, 1): "dp_shard=4", (1, 2): "dp_shard=4,ep=2", (2, 1): "dp_shard=2,cp=2",
                 (2, 2): "dp_shard=2,cp=2,ep=2"}


# ring (p2p) CP, at lengths where its fp32 score tiles make the backward the peak
RING = [Case(preset="tiny-act", mesh="dp_shard=2,cp=2", rows=1, seq_len=2048, cp_comm="p2p"),
        Case(preset="tiny-act", mesh="dp_shard=2,cp=2,ep=2", ac="full", rows=1, seq_len=1024,
             cp_comm="p2p")]


def matrix() -> list[Case]:
    """AC × CP × EP × dispatch (one dispatch when EP is 1: it is not used), for the reference
    model and two transformers families (router AC replays transformers' own topk, which the
    balanced routing here replaces: not run for them); then the ring cases (`RING`)."""
    return [*(Case(preset=preset, mesh=MATRIX_MESHES[cp, ep], ac=ac, dispatch=dispatch)
              for preset in ("tiny-act", "hf:qwen3_moe", "hf:mixtral")
              for ac in ("none", "full", "router", "selective")
              if not (preset.startswith(HF_PREFIX) and ac == "router")
              for cp in (1, 2) for ep in (1, 2)
              for dispatch in (("all_to_all", "all_gather") if ep > 1 else ("all_to_all",))),
            *RING]


def table(results: dict[Case, list[dict[str, int]]]) -> str:
    """Markdown: measured and predicted peak per rank, and the error."""
    from moefn.analyse.estimate import estimate

    lines = ["| model | mesh | ac | dispatch | rank | measured (B) | predicted (B) | error | phase |",
             "|---|---|---|---|---:|---:|---:|---:|---|"]
    for case, runs in results.items():
        plan = meta_plan(case)
        for rank, m in enumerate(runs):
            est = estimate(plan, rank, seq_len=case.seq_len, rows=case.rows, optimizer="sgd")
            assert est.peak is not None and est.activations is not None
            dispatch = case.dispatch if MeshSpec.parse(case.mesh).ep > 1 else "-"
            mesh = f"{case.mesh} (ring, {case.rows}×{case.seq_len})" if case.cp_comm == "p2p" \
                else case.mesh
            lines.append(f"| {case.preset} | {mesh} | {case.ac} | {dispatch} | {rank} | {m['peak']:,} | "
                         f"{est.peak:,} | {est.peak / m['peak'] - 1:+.1%} | "
                         f"{est.activations.phase} |")
    return "\n".join(lines)


if __name__ == "__main__":  # nox -s memory: the full matrix into docs/memory.md
    import sys
    from pathlib import Path

    from tests.ranks import RankPool

    pool = RankPool(4)
    try:
        results = {case: pool.run(run_case, case) for case in matrix()}
    finally:
        pool.close()
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "docs/memory.md")
    text = out.read_text() if out.exists() else ""
    head = text.split("<!-- table -->")[0] if "<!-- table -->" in text else text
    out.write_text(head + "<!-- table -->\n" + table(results) + "\n")
    print(table(results))
