"""`moefn plan --search` and its step-time model: arithmetic on hand-computed cases, group
placement against the MeshSpec's own groups, and every layout returned valid, fitting and equal
to its real plan's communication."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch

from moefn.adapters.reference import MoETransformer, get_preset
from moefn.analyse.comm import Comm
from moefn.analyse.steptime import (
    HardwareProfile,
    Overlap,
    Traffic,
    Work,
    load_profile,
    load_profile_json,
    place,
    placement,
    step_time,
)
from moefn.cli import main
from moefn.plan.errors import PlanError
from moefn.plan.mesh import MeshSpec
from moefn.search import Request, search

GIB = 2**30


def _profile(**over: Any) -> HardwareProfile:
    """1 GFLOP/s, 1 ms per call and 1 kB/s in a node, 2 ms and 100 B/s across, 1 µs per op."""
    data = load_profile_json("h100-sxm")
    data.update(matmul_flops_per_s={"float32": 1e9}, op_overhead_s=1e-6, **over)
    for kind, (lat, bw) in {"intra_node": (1e-3, 1e3), "inter_node": (2e-3, 1e2)}.items():
        data[kind] = {op: {"latency_s": lat, "bandwidth_bytes_per_s": bw} for op in data[kind]}
    return HardwareProfile.from_json(data)


@pytest.mark.parametrize("mesh", ["dp_shard=16,ep=8", "dp_replicate=2,dp_shard=4,cp=2,ep=4",
                                  "dp_replicate=4,dp_shard=2,cp=2,ep=2", "cp=16,ep=16"])
@pytest.mark.parametrize("axes", [("ep",), ("ep_shard",), ("dp_shard_cp",), ("cp",),
                                  ("dp_replicate",), ("dp_shard",)])
def test_placement_is_the_mesh_groups_on_nodes_of_4(mesh: str, axes: tuple[Any, ...]) -> None:
    spec = MeshSpec.parse(mesh)
    members = spec.group_ranks(0, axes)
    assert placement(spec, axes, 4) == (len(members), sum(1 for r in members if r < 4))


def test_hierarchical_hops_are_comm_group_ranks() -> None:
    from moefn import compose, plan_ep
    from moefn.analyse.comm import group_ranks, predict_comm

    with torch.device("meta"):
        model = MoETransformer(get_preset("tiny"))
    plan = compose(plan_ep(dispatch="hierarchical", ranks_per_node=2))(
        model, MeshSpec(dp_shard=8, ep=4)).unwrap()
    hops = [c for c in predict_comm(plan, 8, 2, 64, 4) if c.hop]
    assert hops
    for c in hops:
        members = group_ranks(plan, 0, c)
        assert placement(plan.mesh, c.axes, 2, c.hop, 2) == (
            len(members), sum(1 for r in members if r < 2))


def _comm(op: str, axes: tuple[Any, ...], calls: int, moved: int, name: str) -> Comm:
    return Comm(collective=name, op=op, axes=axes, calls=calls, sent=moved, received=moved,  # type: ignore[arg-type]
                lower_bound=0)


def test_link_arithmetic_by_hand() -> None:
    prof = _profile()
    mesh = MeshSpec(dp_shard=8, ep=8)
    # ep group of 8 on nodes of 4: 3 peers in the node, 4 across; an all-to-all of 700 bytes
    # moves 300 in (0.3 s) and 400 across (4 s) at once, 2 calls × 2 ms, × 2 micro-batches
    a2a = place(_comm("all_to_all", ("ep",), 2, 700, "ep dispatch + combine"), mesh, 4, prof,
                micro_batches=2, imbalance=1.0)
    assert (a2a.intra_bytes, a2a.inter_bytes) == (600, 800)
    assert a2a.seconds == pytest.approx(4 * 2e-3 + 800 / 1e2)
    # imbalance 1.5 scales the EP all-to-all's bytes, not its calls
    worse = place(_comm("all_to_all", ("ep",), 2, 700, "ep dispatch + combine"), mesh, 4, prof,
                  micro_batches=2, imbalance=1.5)
    assert worse.seconds == pytest.approx(4 * 2e-3 + 1.5 * 800 / 1e2)
    # a ring across nodes runs at the inter-node speed for all its bytes; a gradient
    # reduction runs once per step whatever the micro-batches
    ring = place(_comm("reduce_scatter", ("dp_shard_cp",), 1, 700, "fsdp reduce-scatter"), mesh,
                 4, prof, micro_batches=2, imbalance=1.0)
    assert ring.seconds == pytest.approx(2e-3 + 700 / 1e2) and ring.family == "grad"
    # within a node: intra link only
    inside = place(_comm("all_gather", ("ep",), 3, 500, "fsdp all-gather"), mesh, 8, prof,
                   micro_batches=1, imbalance=1.0)
    assert inside.inter_bytes == 0 and inside.seconds == pytest.approx(3e-3 + 500 / 1e3)


def test_overlap_by_hand() -> None:
    prof = _profile()
    work = Work(dense_flops=2e9, expert_flops=1e9, ops=1000, dtype="float32")
    fsdp = Traffic(collective="fsdp all-gather", family="fsdp", calls=1, intra_bytes=0,
                   inter_bytes=0, seconds=5.0)
    ep = Traffic(collective="ep dispatch + combine", family="ep", calls=1, intra_bytes=0,
                 inter_bytes=0, seconds=1.0)
    # compute: 2 s dense + 2 × 1 s experts (imbalance 2) + 1000 × 1 µs
    t = step_time(work, [fsdp, ep], prof, imbalance=2.0)
    assert t.compute_s == pytest.approx(4.001)
    assert t.seconds == pytest.approx(5.0 + 1.0)  # FSDP hidden up to compute, EP exposed
    t = step_time(work, [fsdp, ep], prof, imbalance=2.0, overlap=Overlap(fsdp_gather=False))
    assert t.seconds == pytest.approx(4.001 + 5.0 + 1.0)
    # a machine that hides a quarter of the shorter (compute, 4.001 s) behind FSDP's 5 s
    t = step_time(work, [fsdp, ep], _profile(overlap=0.25), imbalance=2.0)
    assert t.seconds == pytest.approx(4.001 + 5.0 - 0.25 * 4.001 + 1.0)


def test_op_costs_by_hand() -> None:
    # 1 µs per op, 1 kB/s of op bytes, 10 µs and 30 µs per checkpointed forward op
    prof = _profile(op_bytes_per_s=1e3, checkpoint_op_s=1e-5, selective_op_s=3e-5)
    work = Work(dense_flops=0.0, expert_flops=0.0, dtype="float32", ops=2000, op_bytes=500.0,
                checkpointed_ops=100, selective_ops=300)
    assert step_time(work, [], prof).compute_s == pytest.approx(
        2000e-6 + 0.5 + 100 * 1e-5 + 300 * 3e-5)


def test_work_charges_each_ac_mode_its_recompute() -> None:
    from attrs import evolve

    from moefn.opcount import OpCounts, Ops
    from moefn.search import Layout, _work, summarise

    with torch.device("meta"):
        model = MoETransformer(get_preset("tiny"))
    m = evolve(summarise(model, _request(), ("none",)), ops=OpCounts(
        forward=Ops(ops=10, elements=1000), backward=Ops(ops=20, elements=3000),
        checkpointed=Ops(ops=8, elements=900), saved=Ops(ops=2, elements=100)))
    # 2 micro-batches of 32 tokens (half a row of 64): elements × 2 bytes (bf16) × 0.5 × 2
    for ac, elements, full, selective in (("none", 4000, 0, 0), ("full", 4900, 16, 0),
                                          ("router", 4900, 16, 0), ("selective", 4800, 0, 16)):
        layout = Layout(mesh=MeshSpec(dp_shard=8), dispatch="none", ac=ac, reshard=True,
                        rows=1, micro_batches=2)
        work = _work(m, layout, tokens=32, seq_len=64)
        assert (work.ops, work.op_bytes, work.checkpointed_ops, work.selective_ops) == (
            60, elements * 2 * 0.5 * 2, full, selective), ac


def test_shipped_profiles_load_and_bad_ones_name_the_flag(tmp_path: Any) -> None:
    for name in ("h100-sxm", "h200", "b200", "mi300x"):
        assert not load_profile(name).calibrated
    bad = tmp_path / "p.json"
    bad.write_text(json.dumps({"format": "moefn.hardware", "name": "x"}))
    with pytest.raises(PlanError, match="--hardware"):
        load_profile(str(bad))
    with pytest.raises(PlanError, match="no such profile"):
        load_profile(str(tmp_path / "missing.json"))


def _request(**over: Any) -> Request:
    args: dict[str, Any] = dict(world=8, gpus_per_node=4, gpu_memory=GIB, reserve=0, seq_len=64,
                                global_batch_tokens=8 * 64 * 4, profile=load_profile("h100-sxm"),
                                top=4)
    return Request(**{**args, **over})


@pytest.mark.parametrize("preset", ["tiny", "tiny-full"])
def test_every_layout_is_valid_fits_and_matches_its_plan(preset: str) -> None:
    from moefn.analyse.estimate import estimate
    from moefn.plan.compose import compose, plan_or_raise
    from moefn.search import stages

    with torch.device("meta"):
        model = MoETransformer(get_preset(preset))
    request = _request(gpu_memory=3 * 2**20)
    result = search(model, request)
    assert len(result.layouts) == request.top
    for checked in result.layouts:
        layout = checked.exact.layout
        plan = plan_or_raise(compose(*stages(layout, 64))(model, layout.mesh))
        peak = max(estimate(plan, rank=r, seq_len=64, rows=layout.rows).peak or 0
                   for r in (0, layout.mesh.world_size - 1))
        assert peak == checked.exact.peak <= request.gpu_memory
        diff = checked.difference()
        assert (diff["step_time_s"], diff["bytes_intra_node"], diff["bytes_inter_node"]) == (0, 0, 0)


def test_closed_form_communication_is_the_plans_everywhere() -> None:
    """Not only the winners: every layout shape of an 8-rank world, re-planned."""
    from moefn.search import AC_MODES, ClosedForm, exact, layouts, summarise

    with torch.device("meta"):
        model = MoETransformer(get_preset("tiny-full"))
    request = _request()
    from moefn.plan.spec import inspect_model
    spec = inspect_model(model)
    m = summarise(model, request, AC_MODES)
    closed = ClosedForm(m, request)
    from collections import Counter
    seen = set()
    for layout in layouts(request, spec, Counter()):
        key = (layout.mesh, layout.dispatch, layout.ac in ("full", "router"), layout.reshard)
        if key in seen or layout.rows != 1:
            continue
        seen.add(key)
        a, b = exact(m, model, request, layout).step, closed.score(layout).step
        assert (a.seconds, a.bytes_intra_node, a.bytes_inter_node) == pytest.approx(
            (b.seconds, b.bytes_intra_node, b.bytes_inter_node), rel=1e-12), layout
    assert len(seen) > 40


def test_cli_json_and_its_argv_plans(capsys: pytest.CaptureFixture[str]) -> None:
    flags = ["--model", "tiny", "--world", "8", "--gpu-memory", "3MiB", "--reserve", "0B",
             "--gpus-per-node", "4", "--seq-len", "64", "--global-batch-tokens", "2048"]
    assert main(["plan", "--search", *flags, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out["layouts"][0]) >= {"mesh", "argv", "peak_bytes", "step_time_s",
                                      "tokens_per_s_per_gpu", "bytes_intra_node",
                                      "bytes_inter_node"}
    assert out["rejected"] and "pipeline parallelism" in out["not_searched"]
    top = out["layouts"][0]
    assert MeshSpec.parse(top["mesh"]).world_size == 8
    assert main([*top["argv"], "--gpu-memory", "3MiB", "--reserve", "0B", "--json"]) == 0
    planned = json.loads(capsys.readouterr().out)
    assert planned["memory"]["peak"] == top["peak_bytes"]


def test_nothing_fits_names_the_closest_and_the_binding_term(
        capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--search", "--model", "tiny", "--world", "4", "--gpu-memory", "64KiB",
                 "--seq-len", "64", "--global-batch-tokens", "1024", "--json"]) == 1
    out = json.loads(capsys.readouterr().out)
    assert out["layouts"] == [] and out["closest"]
    assert out["closest"][0]["binding"] in ("params", "grads", "optimizer states",
                                            "activations", "buffers")


def test_search_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--search", "--model", "tiny", "--world", "4"]) == 2
    assert "--gpu-memory" in capsys.readouterr().err
    assert main(["plan", "--search", "--model", "tiny", "--world", "4", "--gpu-memory", "1GiB",
                 "--seq-len", "64", "--global-batch-tokens", "100"]) == 2
    assert "multiple of 64" in capsys.readouterr().err
