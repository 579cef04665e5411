"""What realize refuses so that training cannot go silently wrong, on real gloo ranks.

Each guard has a case that failed on an earlier main: a plan realized twice (gradients came out
4× too large), ranks built with different seeds (trained a silent mix), fp32 parameters in a
bf16 model (realized, then FSDP2 failed at the first forward; an fp32 parameter beside bf16 ones
was refused), and a mesh whose refusal hung.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from typing import Any

import pytest
import torch
from returns.pipeline import is_successful
from torch import nn
from torch.distributed.tensor import DTensor

from moefn import MeshSpec, PlanError, RealizeError, compose, diff, plan_ac, plan_cp, plan_ep, plan_fsdp
from moefn.adapters.reference import MoETransformer, get_preset
from moefn.plan.compose import Stage
from moefn.plan.mesh import MAX_WORLD
from moefn.plan.serialize import to_json
from moefn.realize import build_device_meshes, realize
from moefn.realize.digest import tensor_digest
from moefn.train.loop import global_batch, local_batch
from tests.hf_parity import build_hf
from tests.parity import train_side_by_side
from tests.ranks import RankPool

WORLD = 4
PLANS: dict[str, tuple[str, Callable[[], tuple[Stage, ...]]]] = {
    "cp": ("dp_shard=2,cp=2", lambda: (plan_cp(),)),
    "hf-cp": ("dp_shard=2,cp=2", lambda: (plan_cp(),)),  # transformers' attention registry
    "ep": ("dp_shard=4,ep=2", lambda: (plan_ep(),)),
    "ac": ("dp_shard=4", lambda: (plan_ac(mode="full"),)),
    "fsdp": ("dp_shard=4", lambda: (plan_fsdp(precision="fp32"),)),
    "all": ("dp_shard=2,cp=2,ep=2", lambda: (plan_cp(), plan_ep(), plan_ac(), plan_fsdp())),
}


def _snapshot(model: nn.Module) -> dict[str, Any]:
    """Everything a second realize could change: values, parameter objects, hooks, attributes."""
    return {
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "params": {k: id(v) for k, v in model.named_parameters()},
        "hooks": {k: len(v._backward_hooks or {}) for k, v in model.named_parameters()},
        "attrs": {p: {k: id(v) for k, v in vars(m).items()} for p, m in model.named_modules()},
    }


def _same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return (a["params"] == b["params"] and a["hooks"] == b["hooks"] and a["attrs"] == b["attrs"]
            and all(torch.equal(a["state"][k], b["state"][k]) for k in a["state"]))


def _realize_twice(rank: int, world: int, name: str) -> dict[str, str]:
    """Realize a kind of plan, then realize it again: the second must refuse, untouched."""
    mesh_text, stages = PLANS[name]
    torch.manual_seed(0)
    model = build_hf("qwen3_moe") if name.startswith("hf") else MoETransformer(get_preset("tiny"))
    mesh = MeshSpec.parse(mesh_text)
    plan = compose(*stages())(copy.deepcopy(model), mesh).unwrap()
    meshes = build_device_meshes(mesh, "cpu")
    realize(plan, model, meshes)
    before = _snapshot(model)
    outcome: dict[str, str] = {}
    try:
        realize(plan, model, meshes)
        outcome["again"] = "accepted"
    except RealizeError as err:
        outcome["again"] = str(err) if _same(before, _snapshot(model)) else "changed the model"
    replanned = compose(*stages())(model, mesh)
    outcome["replanned"] = str(replanned.failure()) if not is_successful(replanned) else "accepted"
    return outcome


def test_a_model_is_realized_once(ranks: Callable[[int], RankPool]) -> None:
    for name in PLANS:  # one kind per call: see tests/ranks.py
        for outcome in ranks(WORLD).run(_realize_twice, name):
            assert "model is already parallelized" in outcome["again"], (name, outcome)
            assert "realized by moefn" in outcome["again"], outcome
            assert "realize on a fresh model" in outcome["again"]
            assert "model is already parallelized" in outcome["replanned"], name


def _realize_per_rank_seeds(rank: int, world: int, how: str) -> str:
    seed = {"same": 0, "rank": rank, "one-differs": int(rank == 2)}.get(how, 0)
    torch.manual_seed(seed)
    device = "meta" if how == "one-meta" and rank == 1 else "cpu"
    with torch.device(device):
        model = MoETransformer(get_preset("tiny"))
    mesh = MeshSpec(dp_shard=world, ep=2)
    plan = compose(plan_ep(), plan_fsdp(precision="fp32"))(model, mesh).unwrap()
    try:
        realize(plan, model, build_device_meshes(mesh, "cpu"))
    except RealizeError as err:
        untouched = not any(isinstance(p, DTensor) for p in model.parameters())
        return str(err) if untouched else "changed the model"
    return "accepted"


@pytest.mark.parametrize("how", ["same", "rank", "one-differs", "one-meta"])
def test_ranks_with_different_weights_are_refused(ranks: Callable[[int], RankPool],
                                                  how: str) -> None:
    outcomes = ranks(WORLD).run(_realize_per_rank_seeds, how)
    if how == "same":
        assert outcomes == ["accepted"] * WORLD
        return
    assert len(set(outcomes)) == 1, outcomes  # the same error on every rank
    text = outcomes[0]
    assert "embed.weight: ranks hold different values" in text, text  # the first parameter
    assert ("rank 1 meta" if how == "one-meta" else f"rank {1 if how == 'rank' else 2} digest") \
        in text, text
    assert "same seed on every rank" in text


def test_value_digest_sees_every_byte_and_position() -> None:
    t = torch.randn(3, 5, dtype=torch.float64)
    digest = int(tensor_digest(t))
    assert digest == int(tensor_digest(t.clone().t().contiguous().t()))  # layout does not matter
    for index in range(t.numel()):
        changed = t.clone().reshape(-1)
        changed[index] = torch.nextafter(changed[index], torch.tensor(torch.inf, dtype=t.dtype))
        assert int(tensor_digest(changed)) != digest, index
    assert int(tensor_digest(t.flip(0))) != digest  # a permutation is a difference
    assert int(tensor_digest(torch.ones(3, dtype=torch.int8))) \
        != int(tensor_digest(torch.ones(4, dtype=torch.int8)))


# --- fp32 parameters inside a bf16 model ----------------------------------------------------


def _bf16_with_fp32_norms(seed: int = 0) -> MoETransformer:
    """A bf16 model whose norms and routers keep fp32 parameters (both compute in x's dtype)."""
    torch.manual_seed(seed)
    model = MoETransformer(get_preset("tiny")).to(torch.bfloat16)
    for module in model.modules():
        if type(module).__name__ in ("RMSNorm", "Router"):
            module.float()
    return model


def _scale_output(module: nn.Module, args: Any, out: torch.Tensor) -> torch.Tensor:
    return (out.float() * module.get_parameter("decay")).to(out.dtype)


def _bf16_with_fp32_beside_bf16(seed: int = 0) -> MoETransformer:
    """`_bf16_with_fp32_norms`, plus an fp32 ``decay`` held by each attention module next to its
    bf16 projections (as Mamba's ``A_log`` sits on the mixer): no module holds only fp32 there."""
    model = _bf16_with_fp32_norms(seed)
    for layer in model.layers:
        attn = layer.get_submodule("attn")
        attn.register_parameter("decay", nn.Parameter(torch.linspace(0.5, 1.5, 32)))
        attn.register_forward_hook(_scale_output)
    return model


def _one_step_side_by_side(reference: nn.Module, stages: tuple[Stage, ...], mesh: MeshSpec,
                           rank: int) -> tuple[nn.Module, dict[str, Any]]:
    """Realize a copy of ``reference`` and run one step of both (`train_side_by_side`)."""
    model = copy.deepcopy(reference)
    realize(compose(*stages)(model, mesh).unwrap(), model, build_device_meshes(mesh, "cpu"))
    batch = global_batch(reference.config, 4, 16, 0)
    return model, train_side_by_side(reference, model, batch, local_batch(batch, mesh, rank),
                                     lr=0.0, steps=1)


FP32_PARAMS = ("layers.0.attn_norm.weight", "layers.1.mlp.router.weight", "layers.0.attn.decay",
               "layers.1.attn.decay")


def _train_bf16_with_fp32_norms(rank: int, world: int) -> dict[str, Any]:
    mesh = MeshSpec(dp_shard=world, ep=2)
    model, result = _one_step_side_by_side(_bf16_with_fp32_beside_bf16(),
                                           (plan_ep(), plan_ac(), plan_fsdp()), mesh, rank)
    for name in FP32_PARAMS:
        param = model.get_parameter(name)
        grad = param.grad
        assert grad is not None
        full = grad.full_tensor() if isinstance(grad, DTensor) else grad
        result[name] = (str(param.dtype), str(grad.dtype), result["grad_errors"][name],
                        type(param).__name__, full.tolist() if name.endswith("decay") else None)
    return result


def test_fp32_parameters_in_a_bf16_model_stay_fp32(ranks: Callable[[int], RankPool]) -> None:
    """fp32 norms and routers get fp32 units of their own; an fp32 parameter beside bf16 ones
    stays outside FSDP with an fp32 gradient all-reduce (the same on every rank)."""
    results = ranks(WORLD).run(_train_bf16_with_fp32_norms)
    result = results[0]
    (loss,), (ref,) = result["losses"], result["reference"]
    assert abs(loss - ref) <= 2e-2 * abs(ref), result
    for name in FP32_PARAMS:
        param_dtype, grad_dtype, error, kind, _ = result[name]
        assert param_dtype == grad_dtype == "torch.float32", result
        assert kind == ("Parameter" if name.endswith("decay") else "DTensor"), (name, kind)
        assert error <= 5e-2, (name, result)  # bf16 compute on both sides, summed in another order
        assert all(r[name][4] == result[name][4] for r in results), name  # reduced over ranks


def _bf16_compute_without_expert_units(rank: int, world: int) -> tuple[float, float]:
    """ep = world leaves ep_shard = 1: the experts get no FSDP unit and stay fp32 while the
    blocks compute in bf16 (grouped_mm refused the mix: "BFloat16 != float")."""
    torch.manual_seed(0)
    mesh = MeshSpec(dp_shard=world, ep=world)
    _, result = _one_step_side_by_side(MoETransformer(get_preset("tiny")),
                                       (plan_ep(), plan_fsdp(precision="bf16")), mesh, rank)
    return result["losses"][0], result["reference"][0]


def test_bf16_compute_reaches_experts_without_a_unit(ranks: Callable[[int], RankPool]) -> None:
    loss, ref = ranks(WORLD).run(_bf16_compute_without_expert_units)[0]
    assert abs(loss - ref) <= 2e-2 * abs(ref), (loss, ref)


def test_fp32_modules_get_units_that_keep_their_dtype() -> None:
    with torch.device("meta"):
        model = _bf16_with_fp32_norms()
    plan = compose(plan_fsdp())(model, MeshSpec(dp_shard=4)).unwrap()
    units = {s.path: s for s in plan.steps if type(s).__name__ == "FullyShard"}
    assert (units["layers.0.attn_norm"].param_dtype, units["layers.0.attn_norm"].reduce_dtype) \
        == (None, None)
    assert units["layers.0"].param_dtype == "bfloat16"
    assert units[""].param_dtype is None  # the root holds only the final fp32 norm


def test_fp32_parameters_beside_bf16_ones_stay_outside_fsdp() -> None:
    with torch.device("meta"):
        model = _bf16_with_fp32_beside_bf16()
    plan = compose(plan_fsdp())(model, MeshSpec(dp_shard=4)).unwrap()
    kept = {s.path: s for s in plan.steps if type(s).__name__ == "KeepDtype"}
    assert sorted(kept) == ["layers.0.attn", "layers.1.attn"], plan.steps
    assert (kept["layers.0.attn"].params, kept["layers.0.attn"].dtype,
            kept["layers.0.attn"].mesh_dims) == (("decay",), "float32", ("dp_shard_cp",))
    units = {s.path: s for s in plan.steps if type(s).__name__ == "FullyShard"}
    assert "layers.0.attn.decay" in units["layers.0"].ignored
    assert "layers.0.attn.decay" in units[""].ignored
    assert "layers.0.attn" not in units  # a unit there would hold bf16 projections too
    text = diff(plan)
    assert "keep decay in float32 outside FSDP (ignored_params); gradient all-reduce (sum, " \
           "float32) over dp_shard_cp(4)" in text, text
    assert '"record": "KeepDtype"' in to_json(plan)


def test_fp32_precision_on_a_bf16_model_is_refused() -> None:
    with torch.device("meta"):
        model = _bf16_with_fp32_norms()
    failure = compose(plan_fsdp(precision="fp32"))(model, MeshSpec(dp_shard=4)).failure()
    assert isinstance(failure, PlanError)
    assert 'precision="fp32" on parameters that are not fp32' in str(failure)
    assert "model.float()" in str(failure)
    assert is_successful(compose(plan_fsdp(precision="fp32"))(model.float(), MeshSpec(dp_shard=4)))


# --- refusals answer at once ----------------------------------------------------------------


@pytest.mark.parametrize(("sizes", "fix"), [
    ({"dp_shard": MAX_WORLD, "ep": 2}, "use ep in (1, 2147483647)"),  # a prime world
    ({"dp_shard": 2**30, "cp": 1, "ep": 3}, "use ep in (1, 2, 4, 8, 16, 32, 64, 128)"),
    ({"dp_shard": 2**31, "ep": 2}, f"at or below {MAX_WORLD} ranks"),
    ({"dp_replicate": 10**40, "ep": 1}, f"at or below {MAX_WORLD} ranks"),
])
def test_mesh_refusals_answer_at_once(sizes: dict[str, int], fix: str) -> None:
    start = time.monotonic()
    with pytest.raises(PlanError) as err:
        MeshSpec(**sizes)
    assert time.monotonic() - start < 5.0  # a hang guard, not a speed target
    assert fix in str(err.value)


def test_expert_count_refusal_names_a_bounded_list() -> None:
    with torch.device("meta"):
        model = MoETransformer(get_preset("tiny"))
    start = time.monotonic()
    failure = compose(plan_ep())(model, MeshSpec(dp_shard=720720 * 16, ep=16)).failure()
    assert time.monotonic() - start < 5.0
    assert "use ep in (1, 2, 4, 8)" in str(failure)
