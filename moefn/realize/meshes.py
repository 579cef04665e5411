"""Build the real DeviceMesh views of a MeshSpec (effectful: creates process groups).

One 1-D world mesh is unflattened four times — dense ``(dp_replicate, dp_shard, cp, tp)``, data
``(dp_replicate, dp_shard_cp, tp)``, tokens ``(dp_replicate, dp_shard_cp_tp)`` and expert
``(dp_replicate, ep_shard, ep)`` — so every named group comes from adjacent dimensions of one
parent and the submeshes of the views agree (FSDP can then shard ep- and tp-placed DTensors).

>>> from moefn.launch import fake_world
>>> with fake_world(world_size=4):
...     meshes = build_device_meshes(MeshSpec(dp_shard=4, ep=2), "cpu")
...     meshes.get(("ep_shard",)).size()
2
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from attrs import frozen
from torch.distributed import ProcessGroup
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from moefn.launch import launched_by_torchrun
from moefn.plan.arguments import expect_type
from moefn.plan.errors import RealizeError
from moefn.plan.mesh import DENSE_DIMS, EXPERT_DIMS, Axis, MeshSpec


@frozen
class DeviceMeshes:
    spec: MeshSpec
    world: DeviceMesh
    dense: DeviceMesh
    expert: DeviceMesh
    data: DeviceMesh
    tokens: DeviceMesh | None = None  # only with tp > 1

    @property
    def device_type(self) -> str:
        return self.world.device_type

    def get(self, dims: tuple[Axis, ...]) -> DeviceMesh:
        """The (sub)mesh over named axes, e.g. ``("dp_replicate", "dp_shard_cp")`` or ``("ep",)``."""
        if "dp_shard_cp_tp" in dims and self.tokens is not None:
            return self.tokens[dims]
        if "dp_shard_cp" in dims or dims == ("tp",):  # tp DTensors and FSDP on one view
            return self.data[dims]
        if all(d in EXPERT_DIMS for d in dims) and any(d in ("ep", "ep_shard") for d in dims):
            return self.expert[dims]
        if all(d in DENSE_DIMS for d in dims):
            return self.dense[dims]
        raise RealizeError.single("mesh", "no such mesh axes", dims,
                                  "use axes of one view: dense or expert")


    def group(self, dims: tuple[Axis, ...]) -> ProcessGroup:
        """One process group spanning ``dims`` (several axes are flattened into one)."""
        mesh = self.get(dims)
        if mesh.ndim > 1:
            mesh = mesh._flatten("_".join(dims))
        return mesh.get_group()


def build_device_meshes(spec: MeshSpec, device_type: str) -> DeviceMeshes:
    """Create the meshes for ``spec`` on ``device_type`` ("cpu" with gloo, "cuda" with NCCL)."""
    expect_type(spec, MeshSpec, "spec", "a MeshSpec", "pass plan.mesh or MeshSpec(...)")
    expect_type(device_type, str, "device_type", "a str", 'pass "cpu" (gloo) or "cuda" (NCCL)')
    _check_device_type(device_type)
    ranks = dist.get_world_size() if dist.is_initialized() else None
    if ranks is None and not launched_by_torchrun():
        raise RealizeError.single("mesh", "no process group to build the meshes on",
                                  f"{spec.world_size} ranks wanted",
                                  "call torch.distributed.init_process_group first "
                                  "or launch with torchrun")
    if ranks is not None and ranks < spec.world_size:
        raise RealizeError.single("mesh", "process group smaller than the mesh",
                                  f"mesh {spec.world_size} ranks, process group {ranks}",
                                  f"launch {spec.world_size} ranks or plan for {ranks}")
    world = init_device_mesh(device_type, (spec.world_size,), mesh_dim_names=("world",))
    views = {name: world._unflatten(0, sizes, dims)
             for name, (dims, sizes) in expected_views(spec).items() if name != "world"}
    return DeviceMeshes(spec, world, **views)


def _check_device_type(device_type: str) -> None:
    """A device type torch knows, without an index, whose devices this process has."""
    try:
        device = torch.device(device_type)
    except RuntimeError as err:
        raise RealizeError.single("device_type", "not a torch device type", repr(device_type),
                                  'pass "cuda" (NCCL) or "cpu" (gloo)') from err
    if device.index is not None:
        raise RealizeError.single("device_type", "a device, not a device type", repr(device_type),
                                  f"pass {device.type!r}: each rank uses its LOCAL_RANK's device")
    if device.type == "meta":
        raise RealizeError.single("device_type", "meta tensors cannot communicate", "'meta'",
                                  'plan on meta, realize on "cuda" or "cpu" (moefn.launch.'
                                  "fake_world stands in for a large world)")
    if not torch.get_device_module(device.type).is_available():
        raise RealizeError.single("device_type", "no such device in this process",
                                  repr(device_type), 'pass "cpu" (gloo) here, or run where '
                                  f"torch.{device.type}.is_available()")


def expected_views(spec: MeshSpec) -> dict[str, tuple[tuple[str, ...], tuple[int, ...]]]:
    """Dim names and sizes of each DeviceMeshes view that ``spec`` asks for: without tp, no tp
    dims and no tokens view (each view's dims are process groups realize would create)."""
    tp = (("tp",), (spec.tp,)) if spec.tp > 1 else ((), ())
    views = {
        "world": (("world",), (spec.world_size,)),
        "dense": (("dp_replicate", "dp_shard", "cp", *tp[0]),
                  (spec.dp_replicate, spec.dp_shard, spec.cp, *tp[1])),
        "expert": (EXPERT_DIMS, (spec.dp_replicate, spec.ep_shard, spec.ep)),
        "data": (("dp_replicate", "dp_shard_cp", *tp[0]),
                 (spec.dp_replicate, spec.dp_shard * spec.cp, *tp[1])),
    }
    if spec.tp > 1:
        views["tokens"] = (("dp_replicate", "dp_shard_cp_tp"),
                           (spec.dp_replicate, spec.dp_shard * spec.cp * spec.tp))
    return views
