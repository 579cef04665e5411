"""realize: the only effectful step — apply a ShardPlan to a model on a device mesh.

>>> import torch
>>> from moefn import MeshSpec, compose, plan_ep, plan_fsdp
>>> from moefn.adapters.reference import MoETransformer, get_preset
>>> from moefn.launch import fake_world
>>> from moefn.realize import build_device_meshes, realize
>>> with torch.device("meta"):
...     model = MoETransformer(get_preset("tiny"))
>>> plan = compose(plan_ep(), plan_fsdp())(model, MeshSpec(dp_shard=4, ep=2)).unwrap()
>>> with fake_world(world_size=4):  # on GPUs: under torchrun, with build_device_meshes(..., "cuda")
...     model = realize(plan, model, build_device_meshes(plan.mesh, "cpu"))
>>> type(model).__name__
'FSDPMoETransformer'

Order: check everything on every rank, agree across ranks (same plan, no problems anywhere,
the same values in every tensor that is not on meta), then mutate CP → TP → EP → AC → FSDP
(inner FSDP units before outer ones). A failed check raises RealizeError on every rank and
leaves the model untouched.

Importing this package is cheap: `realize` (`moefn.realize.apply_plan`) and the meshes load
on first use, so planning, which imports the dispatchers models call, does not wait for
FSDP and DTensor.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from moefn.realize.apply_plan import realize
    from moefn.realize.meshes import DeviceMeshes, build_device_meshes

_HOMES = {"realize": "moefn.realize.apply_plan", "DeviceMeshes": "moefn.realize.meshes",
          "build_device_meshes": "moefn.realize.meshes"}


def __getattr__(name: str) -> object:
    if name not in _HOMES:
        raise AttributeError(f"module 'moefn.realize' has no attribute {name!r}")
    return getattr(importlib.import_module(_HOMES[name]), name)


__all__ = ["realize", "build_device_meshes", "DeviceMeshes"]
