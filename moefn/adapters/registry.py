"""The one place model kinds are registered: moefn's own adapters first, then the user's.

>>> [adapter.name for adapter in registered_adapters()]
['moefn', 'transformers']
"""

from __future__ import annotations

from torch import nn

from moefn.adapters.adapter import Adapter
from moefn.plan.arguments import expect_type
from moefn.plan.errors import PlanError
from moefn.plan.spec import register_recogniser

_REGISTERED: list[Adapter] = []


def registered_adapters() -> tuple[Adapter, ...]:
    """The reference model's and transformers' adapters, then every `register_adapter`-ed one."""
    from moefn.adapters.reference.adapter import REFERENCE
    from moefn.adapters.transformers.adapter import TRANSFORMERS

    return REFERENCE, TRANSFORMERS, *_REGISTERED


def register_adapter(adapter: Adapter) -> None:
    """Teach moefn a model kind: planning recognises it (``adapter.recogniser``) and realize
    installs through it. Registering an equal adapter again does nothing."""
    expect_type(adapter, Adapter, "adapter", "an Adapter", "pass moefn.adapters.Adapter(...)")
    known = registered_adapters()
    if adapter in known:
        return
    if any(a.name == adapter.name for a in known):
        raise PlanError.single("adapter.name", "another adapter has this name", repr(adapter.name),
                               "give the adapter (and its recogniser) a name of its own")
    register_recogniser(adapter.recogniser)
    _REGISTERED.append(adapter)


def adapter_for(model: nn.Module) -> Adapter | None:
    """The first registered adapter that recognises ``model``, or None."""
    return next((a for a in registered_adapters() if a.recognise(model)), None)
