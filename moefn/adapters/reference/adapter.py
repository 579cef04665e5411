"""The reference model's adapter: its core attention takes an ``impl``, its experts a
``dispatcher``; its routers call `moefn.realize.routing_tape.route`, so no replay hook."""

from __future__ import annotations

from torch import nn
from torch.distributed import ProcessGroup

from moefn.adapters.adapter import Adapter
from moefn.plan.options import CpComm
from moefn.plan.reference_roles import ReferenceRecogniser, is_reference_model
from moefn.realize.context_parallel import AllGatherKVAttention
from moefn.realize.dispatch import Dispatcher
from moefn.realize.ring_attention import RingKVAttention


def _takes_impl(module: nn.Module) -> bool:
    return hasattr(module, "impl")


def _takes_dispatcher(module: nn.Module) -> bool:
    return hasattr(module, "dispatcher")


def _install_context_parallel(module: nn.Module, group: ProcessGroup, comm: CpComm) -> None:
    kind = RingKVAttention if comm == "p2p" else AllGatherKVAttention
    setattr(module, "impl", kind(group))


def _install_dispatch(module: nn.Module, dispatcher: Dispatcher, block: nn.Module) -> None:
    setattr(module, "dispatcher", dispatcher)


REFERENCE = Adapter(
    name="moefn", recogniser=ReferenceRecogniser(), recognise=is_reference_model,
    accepts_dispatch=_takes_dispatcher, install_dispatch=_install_dispatch,
    accepts_context_parallel=_takes_impl, install_context_parallel=_install_context_parallel)
