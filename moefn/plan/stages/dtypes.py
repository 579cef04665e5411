"""Parameters that must not take an FSDP unit's compute dtype, and where they go instead (pure).

torch 2.13's FSDP2 wants one original dtype per unit (it asserts "uniform original parameter
dtype" at the first forward) and casts every parameter of a unit to its ``param_dtype``. Kept
parameters are those whose dtype differs from the model's (an fp32 norm in a bf16 model: kept as
stored) and, under a low-precision policy, those a recognised module keeps in fp32 (role
``keep_fp32``: a router, a Mamba mixer's ``A_log``/``D``/``dt_bias``; compute and reduce in fp32).

One mechanism places them: a module whose trainable parameters (below any deeper unit) are all
kept the same way becomes a unit of its own with those dtypes; a kept parameter beside others
(transformers keeps ``A_log`` on the mixer, next to its bf16 projections, and a holder module
would change state-dict keys) stays out of FSDP, ignored by every unit above it, with a
`KeepDtype` step: its gradient all-reduces (sum) in its own dtype over its unit's axes. (Out of
FSDP nothing casts: a ``keep_fp32`` parameter stored in bf16 beside others stays in its unit.)
"""

from __future__ import annotations

from attrs import evolve

from moefn.plan.mesh import Axis
from moefn.plan.records import FullyShard, KeepDtype
from moefn.plan.spec import ModelSpec, TensorInfo, enclosing

Dtypes = tuple[str | None, str | None]
"""A unit's (param_dtype, reduce_dtype); None keeps the parameter's own dtype."""


def covers(path: str, name: str) -> bool:
    return path == "" or name.startswith(path + ".")


def owned(spec: ModelSpec, units: list[FullyShard]) -> dict[str, list[TensorInfo]]:
    """Each unit's trainable parameters: those under it and under no deeper unit, not ignored."""
    out: dict[str, list[TensorInfo]] = {u.path: [] for u in units}
    by_path: dict[str, FullyShard] = {}
    for u in units:
        by_path.setdefault(u.path, u)
    for t in spec.params_under(""):
        owner = next((by_path[p] for p in enclosing(t.name) if p in by_path), None)
        if owner is not None and t.requires_grad and t.name not in owner.ignored:
            out[owner.path].append(t)
    return out


def _major_dtype(params: list[TensorInfo]) -> str:
    """The dtype holding the most trainable elements."""
    sizes: dict[str, int] = {}
    for t in params:
        sizes[t.dtype] = sizes.get(t.dtype, 0) + t.numel
    return max(sorted(sizes), key=lambda d: sizes[d])


def kept_dtypes(spec: ModelSpec, low_precision: bool) -> dict[str, Dtypes]:
    """Kept trainable parameters → the dtypes of a unit that keeps them (see the module doc)."""
    trainable = [t for t in spec.params_under("") if t.requires_grad]
    if not trainable:
        return {}
    model_dtype = _major_dtype(trainable)
    fp32 = set(spec.paths_with("keep_fp32")) if low_precision else set()
    out: dict[str, Dtypes] = {}
    for t in trainable:
        if t.module_path in fp32:
            out[t.name] = ("float32", "float32")
        elif t.dtype != model_dtype:
            out[t.name] = (None, None)
    return out


def _own_units(spec: ModelSpec, units: list[FullyShard],
               kept: dict[str, Dtypes]) -> dict[str, FullyShard]:
    """``units`` plus a unit for each module whose owned parameters are all kept alike (inside
    a unit that owns others too)."""
    by_path = {u.path: u for u in units}
    for path, params in owned(spec, units).items():
        if len({kept.get(t.name) for t in params}) == 1:
            continue
        for t in params:
            want, module = kept.get(t.name), t.module_path
            if want is None or module in by_path:
                continue
            if all(kept.get(p.name) == want for p in params if covers(module, p.name)):
                parent = by_path[path]
                by_path[module] = evolve(
                    parent, path=module, shard_dim=0, param_dtype=want[0], reduce_dtype=want[1],
                    ignored=tuple(n for n in parent.ignored if covers(module, n)))
    return by_path


def _unit_class(params: list[TensorInfo], kept: dict[str, Dtypes]) -> Dtypes | None:
    """None (the policy's dtypes) when a unit owns any parameter that is not kept; otherwise
    the dtypes keeping most of its elements."""
    sizes: dict[Dtypes, int] = {}
    for t in params:
        want = kept.get(t.name)
        if want is None:
            return None
        sizes[want] = sizes.get(want, 0) + t.numel
    return max(sorted(sizes, key=repr), key=lambda d: sizes[d]) if sizes else None


def place_kept(spec: ModelSpec, units: list[FullyShard], low_precision: bool
               ) -> tuple[list[FullyShard], tuple[KeepDtype, ...]]:
    """``units`` with kept parameters in units of their own or ignored, and the `KeepDtype`
    steps of the ignored ones (one per module, dtype and axes)."""
    kept = kept_dtypes(spec, low_precision)
    if not kept:
        return units, ()
    by_path = _own_units(spec, units, kept)
    outside: dict[tuple[str, str, tuple[Axis, ...]], list[str]] = {}
    for path, params in owned(spec, list(by_path.values())).items():
        unit_class = _unit_class(params, kept)
        if unit_class is not None:
            by_path[path] = evolve(by_path[path], param_dtype=unit_class[0],
                                   reduce_dtype=unit_class[1])
        for t in params:
            want = kept.get(t.name)
            if want != unit_class and (want is None or want[0] in (None, t.dtype)):
                key = (t.module_path, t.dtype, by_path[path].mesh_dims)
                outside.setdefault(key, []).append(t.name)
    names = [n for group in outside.values() for n in group]
    placed = [evolve(u, ignored=(*u.ignored, *(n for n in names if covers(u.path, n))))
              for u in by_path.values()]
    return placed, tuple(
        KeepDtype(stage="fsdp", path=module, params=tuple(n.rpartition(".")[2] for n in group),
                  dtype=dtype, mesh_dims=dims)
        for (module, dtype, dims), group in outside.items())
