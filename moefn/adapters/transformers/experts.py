"""Expert parallelism and router-saving checkpointing for transformers' fused experts.

EP goes through transformers' own extension point: `register` adds an experts implementation
``"moefn"`` to ``ExpertsInterface``; `install_dispatcher` gives one experts module a moefn
dispatcher and switches the model's config to ``"moefn"``. The implementation sends each
token to the ranks owning its experts (``self.dispatcher``, a local one when none is
installed; weights applied there, as transformers applies them after the expert) and runs
this rank's experts in the HF layout (`local_experts`): ``gate_up_proj[e]`` is ``[2I, H]``
(``[H, 2I]`` when the class is transposed, e.g. GPT-OSS, whose gate/up are interleaved, biased
and use the class's own ``_apply_gate``). Parameters may be DTensors
(``Shard(0)`` on ``ep``): the local experts are ``.to_local()``.

Router-saving AC: transformers routers call ``torch.topk`` themselves. `install_router_replay`
hooks each router of a block with `moefn.realize.routing_tape.replay_topk`, so that inside a
router-mode checkpoint every ``topk`` it runs is recorded on that checkpoint call's routing
tape in forward and replayed in recompute. Outside such a checkpoint the hooks do nothing.

>>> register()  # realize then calls install_dispatcher on each experts module (tests/test_hf.py)
"""

from __future__ import annotations

from functools import partial

from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from moefn.grouped_experts import ExpertsImpl, run_grouped_experts
from moefn.plan.hf_roles import is_input_scaled
from moefn.realize.dispatch import Dispatcher, LocalDispatch
from moefn.realize.routing_tape import replay_topk

IMPLEMENTATION = "moefn"


def _local(t: Tensor) -> Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _weights(module: nn.Module) -> tuple[Tensor, Tensor | None, Tensor, Tensor | None]:
    """This rank's ``(up[E,in,out], up_bias, down[E,in,out], down_bias)`` of a fused experts module."""
    has_gate = bool(getattr(module, "has_gate", True))
    has_bias = bool(getattr(module, "has_bias", False))
    up_name = "gate_up_proj" if has_gate else "up_proj"
    up = _local(module.get_parameter(up_name))
    down = _local(module.get_parameter("down_proj"))
    if not (getattr(module, "is_transposed", False) or is_input_scaled(module)):  # [E, out, in]
        up, down = up.transpose(1, 2), down.transpose(1, 2)
    up_bias = _local(module.get_parameter(f"{up_name}_bias")) if has_bias else None
    down_bias = _local(module.get_parameter("down_proj_bias")) if has_bias else None
    return up, up_bias, down, down_bias


def _activate(module: nn.Module, h: Tensor) -> Tensor:
    if getattr(module, "has_gate", True) and hasattr(module, "_apply_gate"):
        gated: Tensor = module._apply_gate(h)  # type: ignore[operator]
        return gated
    if getattr(module, "has_gate", True):  # Llama 4: transformers' default gate, written out
        gate, up = h.chunk(2, dim=-1)
        h = up * module.act_fn(gate)  # type: ignore[operator]
        return h
    out: Tensor = module.act_fn(h)  # type: ignore[operator]
    return out


def local_experts(module: nn.Module, x_sorted: Tensor, counts: Tensor, impl: ExpertsImpl = "auto") -> Tensor:
    """This rank's experts on rows grouped by local expert (``counts[e]`` rows for expert ``e``):
    `moefn.grouped_experts.run_grouped_experts` with the module's weights, biases and gate."""
    up, up_bias, down, down_bias = _weights(module)
    y = run_grouped_experts(x_sorted.to(up.dtype), counts, up, down, impl,
                            partial(_activate, module), up_bias, down_bias)
    if getattr(module, "has_post_expert_norm", False):
        norm: nn.Module = module.get_submodule("post_expert_norm")
        y = norm(y)
    return y


def moefn_experts_forward(self: nn.Module, hidden_states: Tensor, top_k_index: Tensor,
                          top_k_weights: Tensor) -> Tensor:
    """transformers experts function ``(self, hidden[T,H], top_k_index[T,K], top_k_weights[T,K])``."""
    dispatcher: Dispatcher | None = getattr(self, "dispatcher", None)
    if dispatcher is None:
        dispatcher = LocalDispatch(int(self.get_parameter("down_proj").shape[0]))

    def local_fn(x_sorted: Tensor, counts: Tensor) -> Tensor:
        impl: ExpertsImpl = getattr(self, "moefn_impl", "auto")
        return local_experts(self, x_sorted, counts, impl)

    return dispatcher(hidden_states, top_k_index, top_k_weights, local_fn)


def register() -> None:
    """Add ``"moefn"`` to transformers' experts implementations (idempotent)."""
    from transformers.integrations.moe import ExpertsInterface

    ExpertsInterface.register(IMPLEMENTATION, moefn_experts_forward)


def input_scaled_moe_forward(block: nn.Module, hidden_states: Tensor) -> tuple[Tensor, Tensor]:
    """Llama 4's MoE block through the dispatcher: the router's scores are zero except at each
    token's top-k, so each (token, chosen expert) becomes one row scaled by its score *before*
    the expert (weight 1 after), and the shared expert is added as transformers does."""
    x = hidden_states.reshape(-1, hidden_states.shape[-1])
    scores, logits = block.router(x)  # type: ignore[operator]
    weights, index = scores.topk(int(getattr(block, "top_k")), dim=1)  # the router's choice, not a new one
    rows = (x.unsqueeze(1) * weights.unsqueeze(-1)).reshape(-1, x.shape[-1])
    routed = block.experts(rows, index.reshape(-1, 1), rows.new_ones(rows.shape[0], 1))  # type: ignore[operator]
    shared: Tensor = block.shared_expert(x)  # type: ignore[operator]
    return shared + routed.view(*index.shape, -1).sum(dim=1), logits


def install_dispatcher(module: nn.Module, dispatcher: Dispatcher, block: nn.Module) -> None:
    """Give ``module`` (fused experts in MoE block ``block``) ``dispatcher`` and switch its
    model to ``"moefn"``.

    The switch is on the module's config (shared by the whole model, as
    ``model.set_experts_implementation`` does); experts without a dispatcher run locally. Input-
    scaled experts (Llama 4) have no experts interface: ``block`` runs `input_scaled_moe_forward`,
    which calls the experts module (so FSDP's hooks gather its shards) with `moefn_experts_forward`.
    """
    register()
    setattr(module, "dispatcher", dispatcher)
    if is_input_scaled(module):
        setattr(module, "forward", partial(moefn_experts_forward, module))
        setattr(block, "forward", partial(input_scaled_moe_forward, block))
        return
    config = getattr(module, "config", None)
    if config is None:
        raise ValueError(f"{type(module).__name__} has no config: not a transformers experts module")
    config._experts_implementation_internal = IMPLEMENTATION


def install_router_replay(block: nn.Module) -> None:
    """Hook every router of ``block`` so router-mode checkpointing replays its top-k choice
    (`moefn.realize.routing_tape.replay_topk`: transformers routers call ``topk`` themselves)."""
    from moefn.plan.hf_roles import routers_in

    for router in routers_in(block):
        replay_topk(router)
