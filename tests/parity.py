"""Parity check run inside each rank: a parallelized model against the single-process model.

Both start from the same seeded weights; the reference trains on the whole global batch, each
rank on its own slice. Gradients are compared per parameter relative to their largest entry.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import torch
from attrs import frozen
from torch import nn
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import loss_parallel

from moefn import MeshSpec, Planner, compose, from_json, stages_from, to_json
from moefn.adapters.reference import MoETransformer, Router, causal_lm_loss, get_preset
from moefn.plan.compose import Stage
from moefn.plan.options import StageOptions
from moefn.plan.records import ShardPlan
from moefn.realize import build_device_meshes, realize
from moefn.train.loop import Batch, global_batch, local_batch


@frozen(kw_only=True)
class Case:
    mesh: str
    stages: tuple[StageOptions, ...]
    preset: str = "tiny"
    batch: int = 4
    seq: int = 16
    steps: int = 2
    lr: float = 0.25
    seed: int = 0
    force_experts: tuple[int, ...] = ()  # route every token to these experts (expert bias)
    freeze: tuple[str, ...] = ()  # parameters that do not train

    def build_stages(self) -> tuple[Stage, ...]:
        return stages_from(self.stages)


def full_grad(param: nn.Parameter) -> torch.Tensor:
    grad = param.grad
    if grad is None:
        raise AssertionError("parameter has no gradient")
    return grad.full_tensor() if isinstance(grad, DTensor) else grad


def worst_relative_error(grads: dict[str, torch.Tensor],
                         reference: dict[str, torch.Tensor]) -> float:
    """Largest ``max|g − ref| / max|ref|`` over the same named gradients."""
    assert grads.keys() == reference.keys()
    return max(float((grads[n] - g).abs().max() / g.abs().max()) for n, g in reference.items())


def build_pair(case: Case) -> tuple[nn.Module, nn.Module, ShardPlan]:
    torch.manual_seed(case.seed)
    reference = MoETransformer(get_preset(case.preset))
    for name in case.freeze:
        reference.get_parameter(name).requires_grad_(False)
    model = copy.deepcopy(reference)
    mesh = MeshSpec.parse(case.mesh)
    plan = planned(compose(*case.build_stages()), model, mesh)
    realize(plan, model, build_device_meshes(mesh, "cpu"))
    return reference, model, plan


def planned(planner: Planner, model: nn.Module, mesh: MeshSpec) -> ShardPlan:
    """The plan, checked to record what made it: its options, and its JSON, plan it again."""
    plan = planner(model, mesh).unwrap()
    for same in (plan, from_json(to_json(plan))):
        assert compose(*stages_from(same.options))(model, same.mesh).unwrap() == plan
    return plan


Outputs = Callable[[nn.Module, Batch], Any]


def model_outputs(model: nn.Module, batch: Batch) -> Any:
    return model(batch.input_ids, batch.position_ids)


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).abs().max()) / max(float(want.abs().max()), 1e-30)


def _control_grads(control: nn.Module, mine: Batch, num_valid: int,
                   outputs: Outputs) -> dict[str, torch.Tensor]:
    """Plain data parallelism without moefn: ``control`` (a copy of the reference) on this rank's
    slice, its gradients summed over all ranks by hand."""
    causal_lm_loss(outputs(control, mine), mine.labels, num_valid).backward()
    grads = {}
    for name, param in control.named_parameters():
        if param.grad is not None:
            torch.distributed.all_reduce(param.grad)
            grads[name] = param.grad
    return grads


def train_side_by_side(reference: nn.Module, model: nn.Module, batch: Batch, mine: Batch,
                       lr: float, steps: int, outputs: Outputs = model_outputs,
                       control: nn.Module | None = None, tp: int = 1) -> dict[str, Any]:
    """SGD on both models: ``reference`` on the global ``batch``, ``model`` on this rank's
    ``mine``. Global losses per step and, for the first step, each parameter's relative
    gradient error (a parameter whose gradient is zero on either side is listed; one the loss
    does not reach in ``reference`` is ``unreached``, and an error of inf if ``model`` has a
    nonzero gradient for it). With ``control``, a copy of ``reference`` before any step, also
    the errors of plain data parallelism on the same slices (``control_errors``).

    With ``tp > 1`` the logits are vocabulary-sharded DTensors: the loss and its backward run
    under ``loss_parallel``, and a tp group's loss (its tokens) counts once."""
    opt_ref = torch.optim.SGD(reference.parameters(), lr=lr)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    losses, ref_losses = [], []
    grad_errors: dict[str, float] = {}
    control_errors: dict[str, float] = {}
    zero_grads: list[str] = []
    unreached: list[str] = []
    for step in range(steps):
        opt.zero_grad()
        opt_ref.zero_grad()
        with loss_parallel() if tp > 1 else nullcontext():
            loss = causal_lm_loss(outputs(model, mine), mine.labels, batch.num_valid)
            loss.backward()
        ref_loss = causal_lm_loss(outputs(reference, batch), batch.labels, batch.num_valid)
        ref_loss.backward()
        total = (loss.full_tensor() if isinstance(loss, DTensor) else loss).detach().clone()
        torch.distributed.all_reduce(total)
        losses.append(float(total) / tp)
        ref_losses.append(float(ref_loss.detach()))
        if step == 0:
            ref_params = dict(reference.named_parameters())
            plain = {} if control is None else _control_grads(control, mine, batch.num_valid,
                                                              outputs)
            for name, param in model.named_parameters():
                if not param.requires_grad:
                    continue
                if ref_params[name].grad is None:
                    unreached.append(name)
                    reached = param.grad is not None and float(full_grad(param).abs().max()) > 0
                    grad_errors[name] = float("inf") if reached else 0.0
                    continue
                got, want = full_grad(param), full_grad(ref_params[name])
                if float(want.abs().max()) == 0.0 or float(got.abs().max()) == 0.0:
                    zero_grads.append(name)
                grad_errors[name] = _relative_error(got, want)
                if name in plain:
                    control_errors[name] = _relative_error(plain[name], want)
        opt.step()
        opt_ref.step()
    return {"losses": losses, "reference": ref_losses, "grad_errors": grad_errors,
            "zero_grads": zero_grads, "unreached": unreached, "control_errors": control_errors,
            "max_loss_diff": max(abs(a - b) for a, b in zip(losses, ref_losses, strict=True))}


def run_parity(rank: int, world: int, case: Case) -> dict[str, Any]:
    """`train_side_by_side` for ``case``, plus the parallel model's master dtypes."""
    reference, model, plan = build_pair(case)
    for net in (reference, model):
        for module in net.modules():
            if isinstance(module, Router) and module.expert_bias is not None:
                module.expert_bias[list(case.force_experts)] = 1e3
    batch = global_batch(reference.config, case.batch, case.seq, case.seed)
    result = train_side_by_side(reference, model, batch, local_batch(batch, plan.mesh, rank),
                                case.lr, case.steps, tp=plan.mesh.tp)
    return {**result, "master_dtypes": {str(p.dtype) for p in model.parameters()}}


def assert_parity(result: dict[str, Any], tol: float = 1e-5) -> None:
    assert result["max_loss_diff"] <= tol, (result["losses"], result["reference"])
    assert not result["zero_grads"], f"zero gradients: {result['zero_grads']}"
    assert not result["unreached"], f"no gradient in one process: {result['unreached']}"
    worst = max(result["grad_errors"].items(), key=lambda kv: kv[1])
    assert worst[1] <= tol, f"gradient mismatch {worst}"
