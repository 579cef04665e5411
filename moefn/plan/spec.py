"""ModelSpec: a frozen, pure snapshot of a module tree with role tags.

>>> import torch
>>> from moefn.adapters.reference import MoETransformer, get_preset
>>> with torch.device("meta"):
...     model = MoETransformer(get_preset("tiny"))
>>> spec = inspect_model(model)
>>> spec.paths_with("experts")[:1]
('layers.0.mlp.experts',)
"""

from __future__ import annotations

import hashlib
import math
import sys
from collections import defaultdict
from collections.abc import Iterator

import torch
from attrs import frozen
from torch import nn

from moefn.plan.errors import PlanError
from moefn.plan.hf_roles import HFRecogniser
from moefn.plan.memo import per_object
from moefn.plan.reference_roles import ReferenceRecogniser
from moefn.plan.roles import Fact, Recogniser, Recognition, Role

RECOGNISERS: list[Recogniser] = [ReferenceRecogniser(), HFRecogniser()]


def register_recogniser(recogniser: Recogniser) -> None:
    """Let `inspect_model` (and so every stage) recognise one more model kind, after moefn's
    own; `moefn.adapters.registry.register_adapter` calls it with the adapter's recogniser."""
    if all(r is not recogniser for r in RECOGNISERS):
        RECOGNISERS.append(recogniser)


@frozen(kw_only=True)
class TensorInfo:
    """A parameter or buffer, by its full dotted name (the first name of a tied parameter)."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    requires_grad: bool
    is_buffer: bool = False

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def module_path(self) -> str:
        return self.name.rpartition(".")[0]


@frozen(kw_only=True)
class ModuleInfo:
    path: str
    cls: str
    roles: tuple[Role, ...]
    facts: tuple[Fact, ...] = ()

    def get(self, key: str, default: int | str | bool) -> int | str | bool:
        return next((value for name, value in self.facts if name == key), default)

    def fact(self, key: str) -> int | str | bool:
        for name, value in self.facts:
            if name == key:
                return value
        raise PlanError.single(self.path, "module lacks a fact the planner needs", key,
                               "extend the recogniser for this model family")


@frozen(kw_only=True)
class ModelSpec:
    family: str
    root_class: str
    modules: tuple[ModuleInfo, ...]
    tensors: tuple[TensorInfo, ...]
    tied: tuple[tuple[str, ...], ...]
    already_parallel: tuple[str, ...] = ()

    def module(self, path: str) -> ModuleInfo:
        info = _index(self)[0].get(path)
        if info is not None:
            return info
        raise PlanError.single(path, "no such module in the model", path,
                               "plan against the model you realize")

    def paths_with(self, role: Role) -> tuple[str, ...]:
        return _index(self)[1].get(role, ())

    def params_under(self, path: str) -> tuple[TensorInfo, ...]:
        return _params(self)[0].get(path, ())

    def direct_params(self, path: str) -> tuple[TensorInfo, ...]:
        return _params(self)[1].get(path, ())

    def tensor(self, name: str) -> TensorInfo:
        for t in self.tensors:
            if t.name == name:
                return t
        raise PlanError.single(name, "no such parameter", name, "plan against this model")

    def tie_of(self, name: str) -> tuple[str, ...]:
        for group in self.tied:
            if name in group:
                return group
        return (name,)

    def fingerprint(self) -> str:
        """Digest of names, shapes, dtypes and ties (not values): equal for equal structure."""
        h = hashlib.sha256()
        for t in self.tensors:
            h.update(f"{t.name}|{t.shape}|{t.dtype}|{t.requires_grad}|{t.is_buffer};".encode())
        h.update(repr(self.tied).encode())
        return h.hexdigest()[:16]


@per_object
def _index(spec: ModelSpec) -> tuple[dict[str, ModuleInfo], dict[str, tuple[str, ...]]]:
    """Modules by path (the first of a path) and paths by role, in module order."""
    by_path: dict[str, ModuleInfo] = {}
    by_role: dict[str, list[str]] = {}
    for info in spec.modules:
        by_path.setdefault(info.path, info)
        for role in dict.fromkeys(info.roles):
            by_role.setdefault(role, []).append(info.path)
    return by_path, {role: tuple(paths) for role, paths in by_role.items()}


@per_object
def _params(spec: ModelSpec) -> tuple[dict[str, tuple[TensorInfo, ...]],
                                      dict[str, tuple[TensorInfo, ...]]]:
    """Parameters (not buffers) under each module path and directly on it, in tensor order."""
    under: dict[str, list[TensorInfo]] = defaultdict(list)
    direct: dict[str, list[TensorInfo]] = defaultdict(list)
    for t in spec.tensors:
        if not t.is_buffer:
            direct[t.module_path].append(t)
            for path in enclosing(t.name):
                under[path].append(t)
    return ({p: tuple(ts) for p, ts in under.items()},
            {p: tuple(ts) for p, ts in direct.items()})


def enclosing(name: str) -> Iterator[str]:
    """The module paths containing a parameter or module ``name``, innermost first, the root
    (``""``) last.

    >>> list(enclosing("layers.0.attn.q.weight"))
    ['layers.0.attn.q', 'layers.0.attn', 'layers.0', 'layers', '']
    """
    while name:
        name = name.rpartition(".")[0]
        yield name


REALIZED = "_moefn_realized"
"""Attribute `realize` sets on the model and on every module it changes (value: what changed)."""


def _already_parallel(model: nn.Module) -> Iterator[str]:
    """Modules that moefn, FSDP or checkpointing changed; DTensor parameters when none did
    (no DTensor exists before torch.distributed.tensor is imported: planning need not load it)."""
    dtensor = sys.modules.get("torch.distributed.tensor")
    flagged = False
    for path, module in model.named_modules():
        kind = type(module).__name__
        signs = [kind] if "FSDP" in kind or kind == "CheckpointWrapper" else []
        if getattr(module, REALIZED, None):
            signs.append(f"realized by moefn ({getattr(module, REALIZED)})")
        if getattr(module, "_moefn_checkpoint", None):
            signs.append("checkpointed block")
        if signs:
            flagged = True
            yield f"{path or '(root)'}: {', '.join(signs)}"
    if not flagged and dtensor is not None:
        for name, param in model.named_parameters():
            if isinstance(param, dtensor.DTensor):
                yield f"{name}: DTensor parameter"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _recognise(recogniser: Recogniser, model: nn.Module) -> Recognition | None:
    """``recogniser.recognise(model)``; a crash of it (a model it misreads) becomes a PlanError."""
    try:
        return recogniser.recognise(model)
    except PlanError:
        raise
    except Exception as error:  # any bug of a recogniser on some model: refuse it, typed
        raise PlanError.single(
            "", f"the {recogniser.name} recogniser failed on this model", f"{type(error).__name__}: "
            f"{error}", "report it with the model's config; docs/models.md lists every transformers "
            "MoE family and what moefn plans of each") from error


def inspect_model(model: nn.Module) -> ModelSpec:
    """Snapshot ``model`` (any device, meta included). Raises PlanError if no recogniser fits."""
    recognition: Recognition | None = None
    tried: list[str] = []
    for recogniser in RECOGNISERS:
        recognition = _recognise(recogniser, model)
        if recognition is not None:
            break
        tried.append(recogniser.name)
    if recognition is None:
        raise PlanError.single(
            "", "unrecognised model architecture", type(model).__name__,
            f"use a supported model (recognisers tried: {', '.join(tried)}); docs/models.md lists "
            "every transformers MoE family and what moefn plans of each")
    modules = tuple(
        ModuleInfo(path=path, cls=type(module).__name__,
                   roles=tuple(sorted(recognition.roles.get(path, ()))),
                   facts=recognition.facts.get(path, ()))
        for path, module in model.named_modules()
    )
    groups: dict[int, list[str]] = defaultdict(list)
    for name, param in model.named_parameters(remove_duplicate=False):
        groups[id(param)].append(name)
    tensors = [
        TensorInfo(name=name, shape=tuple(p.shape), dtype=_dtype_name(p.dtype),
                   requires_grad=p.requires_grad)
        for name, p in model.named_parameters()
    ]
    tensors += [
        TensorInfo(name=name, shape=tuple(b.shape), dtype=_dtype_name(b.dtype),
                   requires_grad=False, is_buffer=True)
        for name, b in model.named_buffers()
    ]
    return ModelSpec(
        family=recognition.family,
        root_class=type(model).__name__,
        modules=modules,
        tensors=tuple(tensors),
        tied=tuple(tuple(g) for g in groups.values() if len(g) > 1),
        already_parallel=tuple(_already_parallel(model)),
    )
