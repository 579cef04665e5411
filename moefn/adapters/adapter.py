"""What one model kind must give moefn: the `Adapter` record (a frozen record of callables).

Planning reads a model through its kind's ``recogniser`` (pure: roles such as ``experts``,
``core_attention``, ``router``, ``keep_fp32``, and facts such as ``num_experts``). Realizing asks
the kind's adapter to install what the plan's steps name; everything else realize does (DTensor
placement, FSDP units, checkpointing, gradient sync, parameters kept in fp32) is the same for
every kind. An adapter is registered once with `moefn.adapters.registry.register_adapter`.

Parameters kept in fp32 need no hook: the recogniser tags their module ``keep_fp32`` and the
plan's FSDP units and ``KeepDtype`` steps handle them for any kind.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from attrs import frozen
from torch import nn
from torch.distributed import ProcessGroup
from torch.distributed.device_mesh import DeviceMesh

from moefn.plan.options import CpComm
from moefn.plan.roles import Recogniser

if TYPE_CHECKING:  # realize imports this module: no import of realize at run time
    from moefn.realize.dispatch import Dispatcher


@frozen(kw_only=True)
class Adapter:
    """One model kind: ``recognise(model)`` says whether a (root) model is of this kind.

    ``accepts_dispatch`` / ``accepts_context_parallel`` say whether a module can take a token
    dispatcher / a cp group (realize checks every step before it changes anything);
    ``install_dispatch(experts, dispatcher, block)`` makes an experts module (in MoE ``block``)
    send its tokens through the dispatcher (`moefn.realize.dispatch`);
    ``install_context_parallel(attention, group, comm)`` makes an attention module keep its
    queries and see the whole sequence's keys and values over ``group`` (``comm``:
    ``"all_gather"`` or ``"p2p"``; see `moefn.realize.context_parallel` and
    `moefn.realize.ring_attention`);
    ``install_router_replay(block)`` hooks the routers of a block checkpointed in router mode
    (`moefn.realize.routing_tape.replay_topk`), None when the routers call
    `moefn.realize.routing_tape.route` themselves. ``install_tensor_parallel(module, mesh)``
    makes an attention or dense MLP see the whole sequence of the tp group's chunks (with
    `moefn.realize.tensor_parallel.gather_sequence`) and the positions it needs; None: the
    module's first positional argument is gathered (`moefn.realize.tensor_parallel`).
    """

    name: str
    recogniser: Recogniser
    recognise: Callable[[nn.Module], bool]
    accepts_dispatch: Callable[[nn.Module], bool]
    install_dispatch: Callable[[nn.Module, Dispatcher, nn.Module], None]
    accepts_context_parallel: Callable[[nn.Module], bool]
    install_context_parallel: Callable[[nn.Module, ProcessGroup, CpComm], None]
    install_router_replay: Callable[[nn.Module], None] | None = None
    install_tensor_parallel: Callable[[nn.Module, DeviceMesh], None] | None = None
