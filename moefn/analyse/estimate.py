"""Predict per-rank memory and per-step communication from a plan (pure; no GPU, no ranks).

Memory is what each rank allocates, exactly: each parameter's local shape on that rank follows
the plan's shards (``torch.chunk`` semantics, as DTensor and FSDP2 use), and FSDP2 pads its
shards to shard 0's size. Communication is every collective of one
training step with its calls and the bytes the rank sends and receives (`moefn.analyse.comm`), for a
stated tokens-per-rank and top-k.

See `estimate` for an example.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Literal

from attrs import frozen

from moefn.analyse.activations import Activations, activation_memory, hidden_dtype
from moefn.analyse.comm import Comm, predict_comm
from moefn.analyse.dispatch_rows import DispatchRows
from moefn.analyse.layout import fsdp_gathered, fsdp_shard_numel, local_shape, param_layouts
from moefn.plan.arguments import expect_type, int_at_least, one_of
from moefn.plan.dtypes import DTYPE_BYTES
from moefn.plan.errors import PlanError
from moefn.plan.records import FullyShard, ShardPlan
from moefn.plan.spec import enclosing

Optimizer = Literal["adamw", "sgd", "sgd_momentum"]
STATE_COPIES: dict[str, int] = {"adamw": 2, "sgd": 0, "sgd_momentum": 1}


@frozen(kw_only=True)
class Memory:
    """Bytes one rank holds, by kind (``dense``, ``experts``, ``embeddings``)."""

    params: tuple[tuple[str, int], ...]
    grads: tuple[tuple[str, int], ...]
    optimizer: tuple[tuple[str, int], ...]
    dtypes: tuple[tuple[str, str], ...]  # kind → its parameters' dtype(s), e.g. "bfloat16+float32"
    gathered_peak: int  # most unsharded parameter bytes FSDP holds at once in forward
    offloaded: int = 0  # bytes of the above kept on the host (FSDP units with CPU offload)

    @property
    def total(self) -> int:
        return sum(v for part in (self.params, self.grads, self.optimizer) for _, v in part)


@frozen(kw_only=True)
class Estimate:
    """``activations`` and ``peak`` (bytes: sharded state, buffers and activations) come with a
    ``seq_len``."""

    rank: int
    memory: Memory
    comm: tuple[Comm, ...]
    activations: Activations | None = None
    peak: int | None = None


def _kind(name: str, plan: ShardPlan) -> str:
    spec = plan.model
    inside = set(enclosing(name)) - {""}
    if inside.intersection(spec.paths_with("experts")):
        return "experts"
    if inside.intersection((*spec.paths_with("embed"), *spec.paths_with("lm_head"))):
        return "embeddings"
    return "dense"


def estimate_memory(plan: ShardPlan, rank: int, optimizer: Optimizer = "adamw") -> Memory:
    """Bytes ``rank`` allocates for parameters, gradients and optimizer state, by kind.

    FSDP2 keeps every shard (and the gradient views of its reduce-scatter output) padded to
    shard 0's size, so those are counted padded; optimizer states are ``zeros_like`` of the
    unpadded local shard, in the parameter dtype. Not counted: buffers, and AdamW's scalar
    ``step`` per parameter (a host tensor unless the optimizer is fused or capturable)."""
    expect_type(plan, ShardPlan, "plan", "a ShardPlan", "pass compose(...)(model, mesh).unwrap()")
    if int_at_least(rank, "rank", minimum=0) >= plan.mesh.world_size:
        raise PlanError.single("rank", "rank outside the plan's world", rank,
                               f"use a rank in 0..{plan.mesh.world_size - 1}")
    one_of(optimizer, tuple(STATE_COPIES), "optimizer")
    params: Counter[str] = Counter()
    grads: Counter[str] = Counter()
    states: Counter[str] = Counter()
    units = {u.path: u for u in plan.steps_of(FullyShard)}
    tensors = {t.name: t for t in plan.model.tensors}
    dtypes: dict[str, set[str]] = {}
    offloaded = 0
    for name, layout in param_layouts(plan).items():
        width = DTYPE_BYTES[tensors[name].dtype]
        local = math.prod(local_shape(layout, plan.mesh, rank)) * width
        held = (local if layout.unit is None
                else fsdp_shard_numel(layout, units[layout.unit], plan.mesh)[0] * width)
        kind = _kind(name, plan)
        params[kind] += held
        dtypes.setdefault(kind, set()).add(tensors[name].dtype)
        if tensors[name].requires_grad:
            grads[kind] += held
            states[kind] += local * STATE_COPIES[optimizer]
        if layout.unit is not None and units[layout.unit].offload:
            offloaded += held + (held + local * STATE_COPIES[optimizer]
                                 if tensors[name].requires_grad else 0)
    return Memory(offloaded=offloaded, params=tuple(sorted(params.items())),
                  grads=tuple(sorted(grads.items())),
                  optimizer=tuple(sorted(states.items())),
                  dtypes=tuple((k, "+".join(sorted(v))) for k, v in sorted(dtypes.items())),
                  gathered_peak=_gathered_peak(plan))


def _gathered_peak(plan: ShardPlan) -> int:
    """Most bytes of unsharded parameters FSDP2 holds at once in forward.

    Units run in module order (each from its first parameter). While one runs, FSDP2 holds it,
    the units it is nested in, and every earlier unit that is not resharded after forward (e.g.
    lm_head while an MTP block runs), each padded as gathered, in its param dtype.
    """
    units = {u.path: u for u in plan.steps_of(FullyShard)}
    size: Counter[str] = Counter()
    first: dict[str, int] = {}
    for index, info, unit, numel in fsdp_gathered(plan):
        size[unit.path] += numel * DTYPE_BYTES[unit.param_dtype or info.dtype]
        first.setdefault(unit.path, index)
    peak, kept = 0, set[str]()
    for path in sorted(first, key=first.__getitem__):
        held = {p for p in size if p == path or p == "" or path.startswith(p + ".")} | kept
        peak = max(peak, sum(size[p] for p in held))
        if not units[path].reshard_after_forward:
            kept.add(path)
    return peak


def _top_k(plan: ShardPlan) -> int:
    """The routers' top-k (the first router's; 1 when the model has none)."""
    return next((int(plan.model.module(p).fact("top_k")) for p in plan.model.paths_with("router")
                 if plan.model.module(p).get("top_k", 0)), 1)


def _num_experts(plan: ShardPlan) -> int:
    """The fewest experts of any MoE block (0 when the model has none)."""
    return min((int(plan.model.module(p).fact("num_experts"))
                for p in plan.model.paths_with("experts")), default=0)


def buffer_bytes(plan: ShardPlan) -> int:
    """Bytes of the model's buffers (every rank holds all of them; FSDP2 does not shard them)."""
    return sum(t.numel * DTYPE_BYTES[t.dtype] for t in plan.model.tensors if t.is_buffer)


def estimate(plan: ShardPlan, rank: int = 0, tokens_per_rank: int = 4096, top_k: int | None = None,
             hidden: int | None = None, optimizer: Optimizer = "adamw",
             activation_dtype: str | None = None, seq_len: int | None = None, rows: int = 1,
             imbalance: float = 1.0, dispatch_rows: DispatchRows | None = None) -> Estimate:
    """Memory of ``rank`` and per-step communication for ``tokens_per_rank`` local tokens.

    With ``seq_len``, a micro-batch is ``rows × seq_len`` (``rows × seq_len / cp`` tokens per
    rank, which replace ``tokens_per_rank``) and the estimate adds the activations
    (`moefn.analyse.activations`) and the peak. ``top_k`` defaults to the routers' top-k; ``hidden``
    to the embedding width; the activation dtype to the FSDP compute dtype (else the
    embedding's); ``dispatch_rows`` (per MoE layer) to those expected for uniform routing.

    >>> from moefn.adapters.reference import MoETransformer, get_preset
    >>> from moefn import MeshSpec, compose, plan_fsdp
    >>> import torch
    >>> with torch.device("meta"):
    ...     model = MoETransformer(get_preset("tiny"))
    >>> plan = compose(plan_fsdp())(model, MeshSpec(dp_shard=2)).unwrap()
    >>> est = estimate(plan, seq_len=128, rows=2)
    >>> est.peak == est.memory.total + buffer_bytes(plan) + est.activations.total  # on device
    True
    """
    memory = estimate_memory(plan, rank, optimizer)
    if seq_len is not None:
        int_at_least(seq_len, "seq_len")
        int_at_least(rows, "rows")
        tokens_per_rank = rows * seq_len // plan.mesh.cp
    int_at_least(tokens_per_rank, "tokens_per_rank")
    k = _top_k(plan) if top_k is None else int_at_least(top_k, "top_k")
    experts = _num_experts(plan)
    if 0 < experts < k:
        raise PlanError.single("top_k", "top-k larger than the number of experts",
                               f"top_k={k}, {experts} experts",
                               f"use top_k in 1..{experts}" if top_k is not None
                               else "fix the model's config: route each token to at most "
                                    f"{experts} experts")
    if hidden is not None:
        int_at_least(hidden, "hidden")
    if activation_dtype is not None:
        one_of(activation_dtype, tuple(DTYPE_BYTES), "activation_dtype")
    embed = [t for t in plan.model.tensors if t.module_path in plan.model.paths_with("embed")]
    width = hidden if hidden is not None else (embed[0].shape[-1] if embed else 0)
    dtype = activation_dtype or hidden_dtype(plan)
    comm = predict_comm(plan, tokens_per_rank, k, width, DTYPE_BYTES[dtype], rank, dispatch_rows)
    if seq_len is None:
        return Estimate(rank=rank, memory=memory, comm=comm)
    # foreach AdamW's sqrt(exp_avg_sq): one state copy; SGD's updates run in place
    temporaries = sum(v for _, v in memory.optimizer) // 2 if optimizer == "adamw" else 0
    activations = activation_memory(plan, rows, seq_len, imbalance, temporaries, dtype)
    return Estimate(rank=rank, memory=memory, comm=comm, activations=activations,
                    peak=memory.total - memory.offloaded + buffer_bytes(plan) + activations.total)
