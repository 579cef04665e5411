"""The plan as a diff of the module tree: deterministic plain text, one line per changed path.

``+`` a wrapper or unit added, ``~`` a placement changed, ``[stage]`` the stage that decided it;
identical changes across repeated blocks collapse to one glob line (``layers.*.attn ×61``).

>>> import torch
>>> from moefn import MeshSpec, compose, plan_ep, plan_fsdp
>>> from moefn.adapters.reference import MoETransformer, get_preset
>>> with torch.device("meta"):
...     model = MoETransformer(get_preset("tiny"))
>>> plan = compose(plan_ep(), plan_fsdp())(model, MeshSpec(dp_shard=4, ep=2)).unwrap()
>>> print(diff(plan))  # doctest: +ELLIPSIS
moefn plan: MoETransformer (moefn) on dp_replicate=1 dp_shard=4 cp=1 ep=2 ...
+ layers.*.mlp.experts ×2 ... [ep] dispatch all_to_all over ep(2): 8 experts, 4 per rank
...
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from moefn.analyse.layout import ParamLayout, param_layouts
from moefn.plan.arguments import expect_type
from moefn.plan.errors import path_pattern
from moefn.plan.mesh import Axis, MeshSpec
from moefn.plan.records import (
    ActivationCheckpoint,
    ContextParallelAttention,
    DistributeParams,
    FullyShard,
    InstallDispatch,
    KeepDtype,
    ShardPlan,
    Step,
    SyncGradients,
    TensorParallel,
)
from moefn.plan.tp_heads import local_kv_heads

if TYPE_CHECKING:
    from moefn.analyse.estimate import Estimate


def _axes(dims: tuple[Axis, ...], mesh: MeshSpec) -> str:
    return "×".join(f"{d}({mesh.size(d)})" for d in dims)


def _step_text(step: Step, mesh: MeshSpec) -> tuple[str, str]:
    if isinstance(step, FullyShard):
        dtypes = f"param={step.param_dtype or 'keep'} reduce={step.reduce_dtype or 'keep'}"
        ignored = f" ignores {len(step.ignored)} params" if step.ignored else ""
        return "+", (f"fully_shard mesh={_axes(step.mesh_dims, mesh)} shard_dim={step.shard_dim} "
                     f"reshard={step.reshard_after_forward} {dtypes} offload={step.offload}"
                     f"{ignored}")
    if isinstance(step, InstallDispatch):
        local = step.num_experts // mesh.size(step.mesh_dims[-1])
        nodes = f", {step.ranks_per_node} ranks per node" if step.ranks_per_node else ""
        return "+", (f"dispatch {step.kind} over {_axes(step.mesh_dims, mesh)}: "
                     f"{step.num_experts} experts, {local} per rank{nodes}")
    if isinstance(step, SyncGradients):
        return "+", f"gradient all-reduce (sum) over {_axes(step.mesh_dims, mesh)}"
    if isinstance(step, KeepDtype):
        return "+", (f"keep {', '.join(step.params)} in {step.dtype} outside FSDP (ignored_params); "
                     f"gradient all-reduce (sum, {step.dtype}) over {_axes(step.mesh_dims, mesh)}")
    if isinstance(step, ActivationCheckpoint):
        return "+", f"checkpoint mode={step.mode}"
    if isinstance(step, TensorParallel) and step.style == "replicate":
        why = "MLA latent, whole on every rank"
        if step.kv_heads is not None:
            heads, kv = step.kv_heads
            why = (f"{kv} KV heads, tp {mesh.tp} ({local_kv_heads(heads, kv, mesh.tp)} KV head(s) "
                   f"per rank for its {heads // mesh.tp} query head(s))")
        return "~", f"replicated over {_axes(step.mesh_dims, mesh)}: {why}; gradient summed over tp"
    if isinstance(step, TensorParallel):
        return "~", f"tensor parallel {step.style} over {_axes(step.mesh_dims, mesh)}"
    if isinstance(step, ContextParallelAttention):
        seq = f", seq_len {step.seq_len}" if step.seq_len else ""
        how = "all-gather K/V" if step.comm == "all_gather" else "ring (p2p) K/V"
        return "+", f"{how} over {_axes(step.mesh_dims, mesh)}, {step.layout} layout{seq}"
    placements = ", ".join(f"{p}@{d}" for d, p in zip(step.mesh_dims, step.placements,
                                                      strict=True))
    return "~", f"distribute {', '.join(step.params)} → {placements}"


def format_bytes(n: int, signed: bool = False) -> str:
    """Bytes in the largest unit (B up to GiB) that keeps the number at or above 1.

    >>> format_bytes(3 * 1024 ** 3 // 2), format_bytes(-2048, signed=True), format_bytes(0, signed=True)
    ('1.500 GiB', '-2.000 KiB', '+0 B')
    """
    value, unit = float(abs(n)), "B"
    for bigger in ("KiB", "MiB", "GiB"):
        if value < 1024:
            break
        value, unit = value / 1024, bigger
    sign = "-" if n < 0 else "+" if signed else ""
    return f"{sign}{value:.3f} {unit}" if unit != "B" else f"{sign}{abs(n)} B"


def format_local_shapes(shapes: tuple[tuple[tuple[int, ...], int], ...]) -> str:
    """``[4, 32]×3 ranks, [2, 32]×1 rank`` (ranks grouped by local shape)."""
    return ", ".join(f"{list(s)}×{n} rank{'s' if n != 1 else ''}" for s, n in shapes)


def _param_text(layout: ParamLayout, mesh: MeshSpec) -> str:
    placed = ", ".join(f"Shard({dim})@{axis}({mesh.size(axis)})" for axis, dim in layout.shards)
    return f"{placed} local {format_local_shapes(layout.local_shapes(mesh))}"


def _param_stage(name: str, layout: ParamLayout, plan: ShardPlan) -> str:
    stages = []
    if name in plan.distributed_params():
        stages.append(plan.distributed_params()[name].stage)
    if layout.unit is not None:
        stages.append("fsdp")
    return "+".join(stages)


def diff_lines(plan: ShardPlan) -> list[tuple[str, str, str, str]]:
    """(symbol, path, stage, text) per change, in module-tree order."""
    order = {m.path: i for i, m in enumerate(plan.model.modules)}
    entries: list[tuple[tuple[int, int, int], tuple[str, str, str, str]]] = []
    for n, step in enumerate(plan.steps):
        if isinstance(step, DistributeParams):
            continue
        symbol, text = _step_text(step, plan.mesh)
        entries.append(((order.get(step.path, -1), 0, n), (symbol, step.path, step.stage, text)))
    distributed = plan.distributed_params()
    for n, (name, layout) in enumerate(param_layouts(plan).items()):
        if not layout.shards and name not in distributed:
            continue
        module = name.rpartition(".")[0]
        entries.append(((order.get(module, -1), 1, n),
                        ("~", name, _param_stage(name, layout, plan), _param_text(layout, plan.mesh))))
    return [line for _, line in sorted(entries, key=lambda e: e[0])]


def render_diff(plan: ShardPlan) -> str:
    """Header, collapsed change lines, and a count line."""
    lines = diff_lines(plan)
    groups: dict[tuple[str, str, str, str], list[str]] = {}
    for symbol, path, stage, text in lines:
        groups.setdefault((symbol, path_pattern(path), stage, text), []).append(path)
    stages = ", ".join(plan.stages) or "none"
    out = [f"moefn plan: {plan.model.root_class} ({plan.model.family}) on {plan.mesh.describe()}; "
           f"stages: {stages}"]
    width = max((len(k[1]) + 8 for k in groups), default=0)
    for (symbol, pattern, stage, text), paths in groups.items():
        label = paths[0] if len(paths) == 1 else f"{pattern} ×{len(paths)}"
        out.append(f"{symbol} {(label or '(root)'):<{width}} [{stage}] {text}")
    added = sum(1 for line in lines if line[0] == "+")
    changed = len(lines) - added
    touched = len({line[1] for line in lines})
    out.append(f"{len(lines)} changes: {added} added (+), {changed} changed (~) "
               f"over {touched} paths ({len(groups)} lines after collapsing repeated blocks)")
    return "\n".join(out)


def _describe(step: Step, mesh: MeshSpec) -> str:
    return _step_text(step, mesh)[1] if not isinstance(step, DistributeParams) else (
        f"distribute {', '.join(step.params)} → "
        + ", ".join(f"{p}@{d}({mesh.size(d)})" for d, p in zip(step.mesh_dims, step.placements,
                                                                strict=True)))


def render_comparison(before: ShardPlan, after: ShardPlan,
                      estimates: tuple[Estimate, Estimate] | None = None) -> str:
    """What changes from ``before`` to ``after`` (same model): steps, memory, communication —
    of rank 0 as ``estimates`` give them (default: `estimate` of each plan's rank 0)."""
    from moefn.analyse.estimate import estimate
    from moefn.plan.errors import PlanError

    if before.model.fingerprint() != after.model.fingerprint():
        raise PlanError.single("", "plans are for different models",
                               f"{before.model.root_class} vs {after.model.root_class}",
                               "compare plans of the same model")
    old = {(type(s).__name__, s.path): s for s in before.steps}
    new = {(type(s).__name__, s.path): s for s in after.steps}
    groups: dict[tuple[str, str, str], list[str]] = {}
    for key in sorted(old.keys() | new.keys(), key=lambda k: (k[1], k[0])):
        a, b = old.get(key), new.get(key)
        if a == b and a is not None and before.mesh.as_text() == after.mesh.as_text():
            continue
        if a is None and b is not None:
            symbol, text = "+", _describe(b, after.mesh)
        elif b is None and a is not None:
            symbol, text = "-", _describe(a, before.mesh)
        elif a is not None and b is not None:
            was, now = _describe(a, before.mesh), _describe(b, after.mesh)
            if was == now:
                continue
            symbol, text = "~", f"{was}  ⇒  {now}"
        else:
            continue
        groups.setdefault((symbol, path_pattern(key[1]), text), []).append(key[1])
    lines = [f"moefn plan comparison: {before.mesh.describe()}  ⇒  {after.mesh.describe()}"]
    for (symbol, pattern, text), paths in groups.items():
        label = paths[0] if len(paths) == 1 else f"{pattern} ×{len(paths)}"
        lines.append(f"{symbol} {label or '(root)'}  {text}")
    a_est, b_est = estimates or (estimate(before), estimate(after))
    lines.append("per-rank memory (rank 0):")
    for part in ("params", "grads", "optimizer"):
        old_bytes: dict[str, int] = dict(getattr(a_est.memory, part))
        new_bytes: dict[str, int] = dict(getattr(b_est.memory, part))
        for kind in sorted(old_bytes.keys() | new_bytes.keys()):
            x, y = old_bytes.get(kind, 0), new_bytes.get(kind, 0)
            lines.append(f"  {part:<10}{kind:<12}{format_bytes(x):>14} → {format_bytes(y):>14}"
                         f"  ({format_bytes(y - x, signed=True)})")
    lines.append("communication per step (rank 0, bytes received):")
    was_c = {f"{c.collective} ({'×'.join(c.axes)})": c.received for c in a_est.comm}
    now_c = {f"{c.collective} ({'×'.join(c.axes)})": c.received for c in b_est.comm}
    for name in sorted(was_c.keys() | now_c.keys()):
        x, y = was_c.get(name, 0), now_c.get(name, 0)
        lines.append(f"  {name:<44}{format_bytes(x):>14} → {format_bytes(y):>14}"
                     f"  ({format_bytes(y - x, signed=True)})")
    return "\n".join(lines)


def diff(plan: ShardPlan, other: ShardPlan | None = None) -> str:
    """The module-tree diff of ``plan``, or what changes from ``plan`` to ``other``."""
    expect_type(plan, ShardPlan, "plan", "a ShardPlan", "pass the plan (result.unwrap())")
    expect_type(other, (ShardPlan, type(None)), "other", "a ShardPlan or None",
                "pass another plan to compare with, or nothing")
    return render_diff(plan) if other is None else render_comparison(plan, other)
