"""Activation memory of one training step on one rank, predicted from a plan (pure).

Every byte is a tensor the model code or torch allocates, read off the forward code of
`moefn.adapters.reference` (and transformers' equivalents) and torch 2.13's autograd formulas, for ``T``
local tokens (rows × seq_len / cp) in the compute dtype (``b`` bytes; fp32 is 4). With tp
(`moefn.realize.tensor_parallel`), norms, routers and MoE blocks see ``T / tp`` tokens; each
attention (dense MLP, lm_head) sees all ``T`` with ``1 / tp`` of the heads (features,
vocabulary), keeps the gathered input, and transformers' attention builds a ``[B, 1, S, S]``
boolean mask; the loss runs under ``loss_parallel`` (three fp32 logit copies in its backward):

- **saved** — what each block keeps for backward. RMSNorm: its fp32 input, the fp32 normed
  tensor (a ``b``-byte one in transformers) and its output; GQA attention: rotary's fp32 input
  and rotated half of q and k, its cos/sin tables (per call; transformers shares one pair),
  q, k and v as SDPA saves them (grouped heads expanded), SDPA's output and log-sum-exp, and
  o_proj's input (a copy: SDPA returns ``[B, H, S, D]`` contiguous); the router's scores and
  top-k; SwiGLU MLPs: gate, silu(gate), up and their product.
  Under AC "full"/"router" a block keeps only its input; "selective" keeps the outputs of
  matmuls, attention, collectives and top-k
  (`moefn.realize.activation_checkpointing.SELECTIVE_SAVED`).
- **recompute** — the block being back-propagated: its whole no-AC saved set (rebuilt by
  recompute when checkpointed) plus the gradients of its widest tensor and of that tensor's
  input, alive together — or, if larger, what ring attention's backward holds
  (`moefn.analyse.cp_memory.ring_backward_bytes`: four fp32 ``[rows, H, S/2, S/2]`` score
  tiles, K/V blocks and fp32 dK/dV accumulators in flight, ``S = seq_len / cp``).
- **dispatch** — what each MoE's token dispatcher keeps: rows received (``T·top_k``, balanced,
  times ``imbalance``) and the experts' intermediates on them, and the combine side (the rows
  returned to this rank's tokens, by slot); ``dispatch_worst`` is what the blocks
  keep, plus the one block recomputed, with all ``ep·T·top_k`` rows of the group sent to this
  rank.
- **cp_kv** — with cp > 1 and ``comm="all_gather"``, each attention's K/V gathered over the
  sequence (``cp`` × local, grouped heads expanded), the gathered positions and its boolean
  causal mask (``T × cp·T`` bytes; SDPA's fused CPU/CUDA kernels never materialise the
  scores); with ``comm="p2p"`` (ring) only its own K/V and the gathered positions (``8·cp·T``):
  the ring saves those with q, its fp32 output (``T·H·Dv·4``, in saved, beside o_proj's copy
  of it) and log-sum-exp (``T·H·4``).
- **logits** — per head, the logits (kept by the caller's outputs), their fp32 upcast (freed
  after log-softmax; none in fp32) and the log-softmax saved by cross-entropy; when backward
  starts, one head's log-softmax gradient and its input gradient on top (both fp32).
- **fsdp_buffers** — torch 2.13's FSDP2: in backward the running unit and the prefetched next
  one unsharded, the running unit's unsharded gradients, and the reduce-scatter input (reduce
  dtype) of the unit before it — ``reduce_scatter_max_input_buffers`` (1) earlier input in
  flight; the running unit's own input is built in its post-backward hook, after its
  activations are freed; in forward the running unit and the previous unit's all-gather
  output. Units never resharded (the root, lm_head) are held throughout. A block's backward
  counts its own unit's buffers; under tp its prefetch is its own projection's unit, not the
  block before it (`_late_prefetch`).
- **optimizer_temporaries** — foreach AdamW's ``sqrt(exp_avg_sq)`` list (one state copy);
  the step runs after backward has freed the activations.

Not modelled: allocator fragmentation and caching, framework overhead (CUDA context, NCCL
buffers), and attention kernels that materialise the ``seq × seq`` scores — such as torch's CPU
SDPA when the q/k and v head widths differ (MLA): it falls back to the math kernel, which keeps
two ``B·H·S·S`` fp32 tensors, so the estimate falls ~20 % short for MLA on CPU, with or without
tp (tiny-act-mla: −22 % at dp_shard=4, −17 % at dp_shard=2,tp=2).

>>> from moefn.adapters.reference import MoETransformer, get_preset
>>> from moefn import MeshSpec, compose, plan_fsdp
>>> import torch
>>> with torch.device("meta"):
...     model = MoETransformer(get_preset("tiny"))
>>> plan = compose(plan_fsdp(precision="fp32"))(model, MeshSpec(dp_shard=2)).unwrap()
>>> act = activation_memory(plan, rows=2, seq_len=64)
>>> act.phase, act.tokens
('backward layers.1', 128)
>>> _logits(act.tokens, 64, 4, heads=1) == 128 * 64 * 4 * 4  # T·V fp32: 4 copies at once
True
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

from attrs import frozen

from moefn.analyse.cp_memory import ring_backward_bytes
from moefn.analyse.layout import fsdp_gathered
from moefn.plan.arguments import int_at_least, one_of
from moefn.plan.dtypes import DTYPE_BYTES
from moefn.plan.errors import PlanError
from moefn.plan.memo import per_object
from moefn.plan.records import (
    ActivationCheckpoint,
    ContextParallelAttention,
    FullyShard,
    InstallDispatch,
    ShardPlan,
)
from moefn.plan.spec import ModelSpec, TensorInfo
from moefn.plan.tp_heads import local_kv_heads

PARTS = ("saved", "recompute", "dispatch", "cp_kv", "logits", "fsdp_buffers",
         "optimizer_temporaries")
_F32 = 4
_IDX = 8  # int64 indices


@frozen(kw_only=True)
class Activations:
    """Bytes on top of the sharded state at this rank's peak, by part (`PARTS`), and where."""

    tokens: int
    phase: str  # "forward", "logits", "backward <path>" or "optimizer"
    parts: tuple[tuple[str, int], ...]
    dispatch_worst: int  # the dispatch part if the whole EP group routed every row here

    @property
    def total(self) -> int:
        return sum(v for _, v in self.parts)


@frozen(kw_only=True)
class _Cost:
    """One forward segment (a block, the MTP block, the embedding or a head), in bytes."""

    path: str
    kept: dict[str, int]  # what it keeps for backward under its AC mode, by part
    full: int  # what it keeps without AC (rebuilt by recompute when checkpointed)
    full_dispatch: int  # the dispatch part of ``full``
    transient: int  # gradients alive together while it runs backward


@per_object
def _dims(spec: ModelSpec) -> tuple[int, int]:
    """(hidden, vocab) from the embedding."""
    embeds = set(spec.paths_with("embed"))
    embed = [t for t in spec.tensors if t.module_path in embeds]
    if not embed:
        raise PlanError.single("", "no embedding to size activations by", spec.root_class,
                               "recognise the model's embedding (role 'embed')")
    vocab, hidden = embed[0].shape[0], embed[0].shape[-1]
    if vocab < 1 or hidden < 1:
        raise PlanError.single("", "an empty embedding: no activations to size",
                               f"vocab {vocab}, hidden {hidden}", "give the model a vocabulary "
                               "and a hidden size of at least 1")
    return hidden, vocab


def _under(spec: ModelSpec, path: str) -> tuple[TensorInfo, ...]:
    return spec.params_under(path)


def _tp(plan: ShardPlan) -> int:
    """How many ranks split each attention's heads and the residual stream's tokens (one place,
    so that tests/test_memory_peak.py can show that ignoring tp fails the comparison)."""
    return plan.mesh.tp


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root + ".")


def _norm(t: int, width: int, b: int, moefn: bool) -> int:
    """RMSNorm: fp32 input, normed (fp32 here, ``b`` in transformers), output, rsqrt."""
    return t * width * (_F32 + (_F32 if moefn else b) + b) + t * _F32


def _cp_comm(plan: ShardPlan, path: str) -> str | None:
    """How the context-parallel attention inside ``path`` moves K/V (None: no CP there)."""
    return next((s.comm for s in plan.steps_of(ContextParallelAttention)
                 if _inside(s.path, path)), None)


def _attention(plan: ShardPlan, path: str, t: int, seq: int, b: int,
               moefn: bool) -> tuple[int, int, int, int]:
    """(saved, cp_kv, widest, ring backward's own bytes) of one attention module (``seq``
    local tokens per row; with tp, the gathered sequence and this rank's heads)."""
    spec, cp, tp = plan.model, plan.mesh.cp, _tp(plan)
    info = spec.module(path)
    heads, kv_heads, dim = (int(info.fact(k)) for k in ("n_heads", "n_kv_heads", "head_dim"))
    if min(heads, kv_heads, dim) < 1:
        raise PlanError.single(path, "attention without heads: no activations to size",
                               f"n_heads={heads}, n_kv_heads={kv_heads}, head_dim={dim}",
                               "fix the model's config: at least one head of width 1")
    heads, kv_heads = heads // tp, local_kv_heads(heads, kv_heads, tp)  # tp: this rank's heads
    names = {t_.name.rpartition(".")[0].rpartition(".")[2]: t_ for t_ in _under(spec, path)}
    q_width, kv_width = heads * dim, kv_heads * dim
    comm = _cp_comm(plan, path) if cp > 1 else None
    if "kv_b_proj" in names:  # MLA
        saved, local_kv, dim, v_dim = _mla(names, heads, t, b, moefn, tp)
        kv_heads = heads
        out_copy = b * t * heads * v_dim  # SDPA's output, copied into o_proj's input
        k_sdpa, v_sdpa = b * cp * t * heads * dim, b * cp * t * heads * v_dim
        if comm is None:  # SDPA keeps k (after the cat) and v, a view of kv_b_proj's output
            k_sdpa = b * t * heads * dim
            v_sdpa = local_kv - k_sdpa
    else:
        # rotary keeps only its cos/sin tables (the mul saves what the other side's gradient
        # needs, and the tables need none); SDPA keeps q, k, v, its output and log-sum-exp; its
        # output follows q's [B, S, H, D] memory, so o_proj's input is a view of it
        v_dim, out_copy = dim, 0
        saved = t * heads * _F32 + b * t * q_width + b * t * q_width  # lse, output, q
        saved += 2 * 2 * _F32 * t * dim if moefn else 0  # cos and sin of both rotary calls
        # grouped heads are expanded before SDPA, except by transformers' SDPA path without CP
        # or TP (``enable_gqa``); moefn's attention (transformers' under CP or TP) expands them
        expand = heads > kv_heads and (moefn or cp > 1 or tp > 1)
        for width in _head_norms(spec, path, dim, q_width, kv_width):  # Qwen3's q/k norms
            saved += t * width * (_F32 + (_F32 if moefn else b)) + _F32 * t * width // dim
        k_sdpa = v_sdpa = b * cp * t * (q_width if expand else kv_width)
        local_kv = 2 * b * t * kv_width  # rotary's k; v, a view of v_proj's output
    causal = any(bool(spec.module(p).get("causal", True)) for p in spec.paths_with("core_attention")
                 if _inside(p, path))
    positions = _IDX * cp * t if comm is not None and causal else 0
    widest = max(b * t * q_width, k_sdpa)
    if tp > 1:  # the gathered input, kept by the column-wise linears, and its gradient
        saved += _gathered(spec, t, b)
        widest = max(widest, _gathered(spec, t, b))
    if comm == "p2p":
        # the ring (`moefn.realize.ring_attention`) saves q, its own k and v, the global
        # positions, its fp32 output and lse; o_proj keeps a copy of the output
        saved += _F32 * t * heads * v_dim - out_copy
        ring = ring_backward_bytes(t, seq, heads, kv_heads, dim, v_dim, b, cp, causal)
        return saved, local_kv + positions, widest, ring
    mask = t * cp * t if comm is not None and causal else 0
    if tp > 1 and comm is None and causal and not moefn:
        mask = t * seq  # moefn's attention in transformers: a boolean [B, 1, S, S] mask
    gathered = k_sdpa + v_sdpa + mask + positions
    return (saved, gathered, widest, 0) if comm is not None else (saved + gathered, 0, widest, 0)


def _gathered(spec: ModelSpec, t: int, b: int) -> int:
    """The whole sequence a tp-gathered module (attention, dense MLP, lm_head) keeps as its
    linears' input (`moefn.realize.tensor_parallel.gather_sequence`)."""
    return b * t * _dims(spec)[0]


def _head_norms(spec: ModelSpec, path: str, dim: int, q_width: int,
                kv_width: int) -> list[int]:
    """Widths of per-head RMSNorms on q and k inside an attention (``q_norm``/``k_norm``); each
    keeps its fp32 input, its normed tensor and a per-head rsqrt (the rotary after it keeps
    nothing of its output)."""
    norms = [t for t in _under(spec, path) if t.shape == (dim,)]
    return [q_width if "q" in t.name.rpartition(".")[0].rpartition(".")[2] else kv_width
            for t in norms]


def _mla(names: dict[str, TensorInfo], heads: int, t: int, b: int,
         moefn: bool, tp: int = 1) -> tuple[int, int, int, int]:
    """(saved but K/V, local K/V kept, q/k head width, v head width) of DeepSeek's multi-head
    latent attention (`MLAttention`): q and kv latents through their norms, rotary on q's and
    k's rope parts, q and k concatenated per head, v a view of kv_b_proj's output. ``heads``
    are this rank's (``names`` hold whole shapes: ``tp`` ranks share them)."""
    kv_a = names.get("kv_a_proj", names.get("kv_a_proj_with_mqa"))
    if kv_a is None or "q_b_proj" not in names:
        raise PlanError.single("", "MLA attention without q_b_proj/kv_a_proj", sorted(names),
                               "extend moefn.analyse.activations for this attention")
    q_rank = names["q_a_proj"].shape[0] if "q_a_proj" in names else 0
    kv_rank = names["kv_b_proj"].shape[1]
    rope = kv_a.shape[0] - kv_rank
    qk = names["q_b_proj"].shape[0] // (heads * tp)
    v_dim = names["kv_b_proj"].shape[0] // (heads * tp) - (qk - rope)
    tables = 2 * 2 * _F32 * t * rope if moefn else 0  # cos and sin of both rotary calls
    saved = (_norm(t, q_rank, b, moefn) + _norm(t, kv_rank, b, moefn)
             + (b * t * rope if b == _F32 else 0)  # the kv latent's norm keeps all kv_a_proj
             + tables + b * t * heads * qk  # q after the cat (SDPA's)
             + t * heads * _F32 + 2 * b * t * heads * v_dim)  # lse, SDPA output, o_proj input
    kv_out = b * t * heads * (qk - rope + v_dim)
    return saved, b * t * heads * qk + kv_out, qk, v_dim


def _mlp(t: int, intermediate: int, b: int) -> tuple[int, int]:
    """SwiGLU: gate, silu(gate), up, their product; (saved, widest)."""
    return 4 * b * t * intermediate, b * t * intermediate


def _experts_dims(spec: ModelSpec, path: str, hidden: int) -> tuple[int, int]:
    """(experts, intermediate) of a fused experts module."""
    experts = int(spec.module(path).fact("num_experts"))
    down = [t for t in _under(spec, path) if "down" in t.name and len(t.shape) == 3]
    if not down or experts < 1:
        raise PlanError.single(path, "experts without a 3-D down projection", path,
                               "extend moefn.analyse.activations for this experts layout")
    return experts, down[0].numel // (experts * hidden)


def _moe(plan: ShardPlan, path: str, t: int, b: int, imbalance: float,
         worst: bool) -> tuple[int, int, int]:
    """(token-side saved, dispatch saved, widest) of one MoE module at ``path``."""
    spec = plan.model
    hidden, _ = _dims(spec)
    router = next(p for p in spec.paths_with("router") if _inside(p, path))
    experts = next(p for p in spec.paths_with("experts") if _inside(p, path))
    k = int(spec.module(router).fact("top_k"))
    num, inter = _experts_dims(spec, experts, hidden)
    fp32 = "keep_fp32" in spec.module(router).roles
    d = _F32 if fp32 else b
    token = (t * hidden * _F32 if fp32 and b != _F32 else 0) + t * num * d + _IDX * t * k
    token += 2 * t * k * d + t * d  # routing weights and their normaliser
    step = next((s for s in plan.steps_of(InstallDispatch) if s.path == experts), None)
    ep = plan.mesh.ep if step is not None else 1
    rows = ep * t * k if worst else math.ceil(t * k * (imbalance if step is not None else 1.0))
    # x_sorted, [gate|up], silu(gate), their product; the experts' output (index_copy keeps
    # its source); the order and its token indices
    dispatch = b * rows * (2 * hidden + 4 * inter) + 2 * _IDX * rows
    if step is not None and step.kind == "all_gather":
        dispatch += b * rows  # the routing weights, multiplied on the experts' rank
        widest = max(b * rows * 2 * inter, b * ep * t * (hidden + k))
    elif step is None and spec.family != "moefn":
        # transformers' own experts (no moefn dispatcher): the weights multiply the expert
        # output per row, which is kept; no output by slot
        dispatch += b * rows
        widest = max(b * rows * 2 * inter, b * rows * hidden)
    else:
        # combine, inside the dispatcher too: y by slot, weights; all-to-all's returned rows
        # (index_copy's source)
        dispatch += b * t * k * hidden * (2 if ep > 1 else 1) + b * t * k + _IDX * t * k
        widest = max(b * rows * 2 * inter, b * t * k * hidden)
    shared = [p for p in spec.paths_with("shared_experts") if _inside(p, path)]
    for p in shared:
        gate = max(tt.shape[0] for tt in _under(spec, p) if len(tt.shape) == 2)
        saved, wide = _mlp(t, gate, b)
        token += saved
        widest = max(widest, wide)
    return token, dispatch, widest


def _selective(plan: ShardPlan, path: str, t: int, b: int, cp: int) -> dict[str, int]:
    """Outputs selective AC saves in one block: matmuls, SDPA, collectives, top-k."""
    spec = plan.model
    hidden, _ = _dims(spec)
    kept = {"saved": b * t * hidden + _IDX * t, "dispatch": 0, "cp_kv": 0}
    for attn in (p for p in spec.paths_with("attention") if _inside(p, path)):
        info = spec.module(attn)
        heads, kv_heads, dim = (int(info.fact(k)) for k in ("n_heads", "n_kv_heads", "head_dim"))
        linears = sum(tt.shape[0] for tt in _under(spec, attn) if len(tt.shape) == 2)
        kept["saved"] += b * t * linears + b * t * heads * dim + _F32 * t * heads
        if cp > 1:
            kept["cp_kv"] += 2 * b * cp * t * kv_heads * dim
    for moe in (p for p in spec.paths_with("moe") if _inside(p, path)):
        router = next(p for p in spec.paths_with("router") if _inside(p, moe))
        experts = next(p for p in spec.paths_with("experts") if _inside(p, moe))
        k = int(spec.module(router).fact("top_k"))
        num, inter = _experts_dims(spec, experts, hidden)
        kept["saved"] += t * num * _F32 + t * k * (_F32 + _IDX)
        rows = t * k
        kept["dispatch"] += b * rows * (2 * inter + hidden)
        if plan.mesh.ep > 1:
            kept["dispatch"] += b * rows * hidden + b * t * k * hidden
        for p in spec.paths_with("shared_experts"):
            if _inside(p, moe):
                kept["saved"] += sum(b * t * tt.shape[0] for tt in _under(spec, p)
                                     if len(tt.shape) == 2)
    return kept


def _block(plan: ShardPlan, path: str, t: int, seq: int, b: int, imbalance: float,
           worst: bool) -> _Cost:
    """One block; ``t`` tokens reach its attention, ``t / tp`` its norms and MoE (tp's
    sequence-split residual stream)."""
    spec, cp, tp = plan.model, plan.mesh.cp, _tp(plan)
    hidden, _ = _dims(spec)
    moefn = spec.family == "moefn"
    own = t // tp
    attn = [p for p in spec.paths_with("attention") if _inside(p, path)]
    moes = [p for p in spec.paths_with("moe") if _inside(p, path)]
    full = {"saved": 2 * _norm(own, hidden, b, moefn), "dispatch": 0, "cp_kv": 0}
    widest = ring = 0
    for p in attn:
        saved, gathered, wide, ring_backward = _attention(plan, p, t, seq, b, moefn)
        full["saved"] += saved
        full["cp_kv"] += gathered
        widest, ring = max(widest, wide), max(ring, ring_backward)
    ahead = _norm(own, hidden, b, moefn)  # back-propagated (and freed) before the attention
    for p in moes:
        token, dispatch, wide = _moe(plan, p, own, b, imbalance, worst)
        full["saved"] += token
        full["dispatch"] += dispatch
        ahead += token + dispatch
        widest = max(widest, wide)
    if not moes:
        inside = [tt for tt in _under(spec, path) if len(tt.shape) == 2
                  and not any(_inside(tt.module_path, a) for a in attn)]
        if inside:
            saved, wide = _mlp(t, max(tt.shape[0] for tt in inside) // tp, b)
            saved += _gathered(spec, t, b) if tp > 1 else 0
            full["saved"] += saved
            ahead += saved
            widest = max(widest, wide)
    step = next((c for c in plan.steps_of(ActivationCheckpoint) if _inside(path, c.path)
                 or _inside(c.path, path)), None)
    total = sum(full.values())
    if step is None:
        kept = full
    elif step.mode == "selective":
        kept = _selective(plan, path, t, b, cp)
    else:  # full / router: the block's input (and positions) only
        kept = {"saved": b * own * hidden + _IDX * t, "dispatch": 0, "cp_kv": 0}
    return _Cost(path=path, kept=kept, full=max(total, sum(kept.values())),
                 full_dispatch=full["dispatch"],
                 transient=max(2 * widest, ring - ahead))


def _segments(plan: ShardPlan, t: int, seq: int, b: int, imbalance: float,
              worst: bool) -> Iterator[_Cost]:
    """Forward order: embedding, blocks, final norm, MTP block (its norms and projection);
    ``seq`` local tokens per row."""
    spec = plan.model
    hidden, _ = _dims(spec)
    moefn = spec.family == "moefn"
    yield _Cost(path="embed", kept={"saved": _IDX * t}, full=_IDX * t, full_dispatch=0,
                transient=0)
    for path in spec.paths_with("block"):
        yield _block(plan, path, t, seq, b, imbalance, worst)
    norm = _norm(t // _tp(plan), hidden, b, moefn)
    yield _Cost(path="norm", kept={"saved": norm}, full=norm, full_dispatch=0, transient=0)
    for path in spec.paths_with("mtp"):
        inner = _block(plan, path, t, seq, b, imbalance, worst)
        # norm_h, norm_e, the head's norm; cat → proj
        extra = 3 * norm + b * t // _tp(plan) * 2 * hidden
        yield _Cost(path=path, kept={**inner.kept, "saved": inner.kept["saved"] + extra},
                    full=inner.full + extra, full_dispatch=inner.full_dispatch,
                    transient=inner.transient)


def unit_sizes(plan: ShardPlan) -> list[tuple[str, int, int, bool]]:
    """(path, gathered bytes, reduce-scatter input bytes, resharded after forward) per unit, in
    forward order, nested units folded into their parent (the root apart)."""
    units = {u.path: u for u in plan.steps_of(FullyShard)}
    shallow_first = sorted(units, key=len)
    outers = {path: next((p for p in shallow_first if p and _inside(path, p)), path)
              for path in units}
    gathered: dict[str, int] = {}
    reduced: dict[str, int] = {}
    first: dict[str, int] = {}
    for index, info, unit, numel in fsdp_gathered(plan):
        outer = outers[unit.path]
        dtype = info.dtype
        gathered[outer] = gathered.get(outer, 0) + numel * DTYPE_BYTES[unit.param_dtype or dtype]
        if info.requires_grad:
            width = DTYPE_BYTES[unit.reduce_dtype or unit.param_dtype or dtype]
            reduced[outer] = reduced.get(outer, 0) + numel * width
        first.setdefault(outer, index)
    return [(p, gathered[p], reduced.get(p, 0), units[p].reshard_after_forward)
            for p in sorted(first, key=first.__getitem__)]


def fsdp_buffers(plan: ShardPlan) -> tuple[int, int, int]:
    """Bytes of FSDP2's unsharded buffers: (held all step — the root and units not resharded
    after forward —, forward at its largest, backward at its largest)."""
    return buffers_of(unit_sizes(plan))


def _late_prefetch(plan: ShardPlan, units: Sequence[tuple[str, int, int, bool]]) -> set[str]:
    """Units (blocks) holding tp-sharded linears with FSDP units of their own. FSDP2 prefetches
    in backward the unit that finished its forward just before the running one: for such a
    block, its own output projection; the block before it is gathered only when the block's
    first attention projection runs its backward, after the recomputed activations are freed."""
    inner = {u.path for u in plan.steps_of(FullyShard)} & set(plan.tp_sharded_paths())
    return {p for p, _, _, _ in units if p and any(u != p and _inside(u, p) for u in inner)}


def backward_buffers(plan: ShardPlan) -> dict[str, int]:
    """FSDP2's unsharded bytes while each unit (by path) runs its backward (see `buffers_of`)."""
    units = unit_sizes(plan)
    moving = [p for p, _, _, _ in units if p]
    return dict(zip(moving, _buffers(units, _late_prefetch(plan, units))[3], strict=True))


def buffers_of(units: Sequence[tuple[str, int, int, bool]]) -> tuple[int, int, int]:
    """`fsdp_buffers` of units given as `unit_sizes` gives them. A unit not resharded after
    forward (lm_head, the last block) stays gathered until its own backward reshards it: held
    when the loss runs and while any unit before it runs."""
    held, forward, backward, _ = _buffers(units, set())
    return held, forward, backward


def _buffers(units: Sequence[tuple[str, int, int, bool]],
             late: set[str]) -> tuple[int, int, int, list[int]]:
    """(held, forward at its largest, backward at its largest, backward per unit but the root);
    units in ``late`` run their backward without the one before them (`_late_prefetch`)."""
    root = sum(g for p, g, _, _ in units if p == "")
    moving = [(g, r, reshard) for p, g, r, reshard in units if p != ""]
    prefetched = [p not in late for p, _, _, _ in units if p != ""]
    gathered, reduced = [g for g, _, _ in moving], [r for _, r, _ in moving]
    kept = [0 if reshard else g for g, _, reshard in moving]
    # unit i runs with i − 1's buffer beside it (forward: its all-gather output; backward: the
    # prefetch), in backward its own gradients and i + 1's reduce-scatter input too, and every
    # unit before i − 1 that was not resharded
    earlier = [sum(kept[:max(i - 1, 0)]) for i in range(len(moving))]
    forward = max((g + (gathered[i - 1] if i else 0) + earlier[i]
                   for i, g in enumerate(gathered)), default=0)
    backward = [root + 2 * g + (gathered[i - 1] if i and prefetched[i] else 0) + earlier[i]
                + (reduced[i + 1] if i + 1 < len(moving) else 0) for i, g in enumerate(gathered)]
    return root + sum(kept), root + forward, max(backward, default=root), backward


def _logits(t: int, vocab: int, b: int, heads: int, tp: int = 1) -> int:
    """Every head's logits (``b``) and saved log-softmax (fp32), plus the larger of the last
    head's fp32 upcast (forward; none in fp32) and one head's two fp32 gradients (backward).
    With tp, ``vocab`` is this rank's shard and the loss runs under ``loss_parallel``, whose
    backward holds three fp32 copies (its zeros, their sum with ``exp`` and the product)."""
    upcast = _F32 if b != _F32 else 0
    backward = 3 * _F32 if tp > 1 else 2 * _F32
    return heads * (b + _F32) * t * vocab + max(upcast, backward) * t * vocab


def _recompute(cost: _Cost) -> int:
    """The block in backward: its whole saved set (rebuilt if checkpointed) and gradients."""
    return cost.full + cost.transient


def _tokens(plan: ShardPlan, rows: int, seq_len: int) -> int:
    """Tokens of the rank's sequence (rows × seq_len / cp); tp splits them between blocks."""
    cp, tp = plan.mesh.cp, plan.mesh.tp
    if seq_len % (cp * tp):
        raise PlanError.single("seq_len", "sequence length not divisible by cp·tp", seq_len,
                               f"use a multiple of cp·tp={cp * tp}")
    return rows * seq_len // cp


def hidden_dtype(plan: ShardPlan) -> str:
    """The dtype hidden states travel in: the blocks' FSDP compute dtype, else the embedding's."""
    blocks = set(plan.model.paths_with("block"))
    for unit in plan.steps_of(FullyShard):
        if unit.path in blocks and unit.param_dtype is not None:
            return unit.param_dtype
    embed = [t for t in plan.model.tensors if t.module_path in plan.model.paths_with("embed")]
    return embed[0].dtype if embed else "float32"


def _kept(segments: list[_Cost]) -> dict[str, int]:
    out = dict.fromkeys(("saved", "dispatch", "cp_kv"), 0)
    for c in segments:
        for part, value in c.kept.items():
            out[part] += value
    return out


def activation_phases(plan: ShardPlan, rows: int, seq_len: int, imbalance: float = 1.0,
                      optimizer_states: int = 0, activation_dtype: str = "float32"
                      ) -> list[tuple[str, dict[str, int]]]:
    """Bytes on top of the sharded state by part, at each phase where the peak may fall
    (`activation_memory`'s arguments)."""
    int_at_least(rows, "rows")
    int_at_least(seq_len, "seq_len")
    if not (isinstance(imbalance, int | float) and 1.0 <= imbalance < math.inf):
        raise PlanError.single("imbalance", "routing imbalance below 1 (or not a number)",
                               imbalance, "pass 1.0 for balanced routing, more for skew")
    one_of(activation_dtype, tuple(DTYPE_BYTES), "activation_dtype")
    t, tp = _tokens(plan, rows, seq_len), _tp(plan)
    b = DTYPE_BYTES[activation_dtype]
    _, vocab = _dims(plan.model)
    costs = list(_segments(plan, t, seq_len // plan.mesh.cp, b, imbalance, worst=False))
    heads = 1 + len(plan.model.paths_with("mtp"))
    fsdp_held, fsdp_forward, fsdp_backward = fsdp_buffers(plan)
    running = backward_buffers(plan)  # a block's backward: its unit's buffers

    phases: list[tuple[str, dict[str, int]]] = [
        # the loss runs after the last block's reshard and before any backward prefetch
        ("logits", {**_kept(costs), "logits": _logits(t, vocab // tp, b, heads, tp)
                    + (heads * _gathered(plan.model, t, b) if tp > 1 else 0),
                    "fsdp_buffers": fsdp_held}),
        ("optimizer", {"optimizer_temporaries": optimizer_states})]
    for i, cost in enumerate(costs):
        if cost.full or cost.transient:
            phases.append((f"backward {cost.path}",
                           {**_kept(costs[:i]), "recompute": _recompute(cost),
                            "fsdp_buffers": running.get(cost.path, fsdp_backward)}))
    if costs:  # the last block's forward, its all-gather and the previous one's output held
        phases.append(("forward", {**_kept(costs[:-1]), "fsdp_buffers": fsdp_forward}))
    return phases


def activation_memory(plan: ShardPlan, rows: int, seq_len: int, imbalance: float = 1.0,
                      optimizer_states: int = 0, activation_dtype: str = "float32") -> Activations:
    """Peak bytes on top of parameters, gradients and optimizer states, and its parts.

    ``optimizer_states`` is the bytes of one optimizer state copy on the rank (foreach AdamW's
    temporaries); ``activation_dtype`` the compute dtype."""
    phases = activation_phases(plan, rows, seq_len, imbalance, optimizer_states,
                               activation_dtype)
    phase, parts = max(phases, key=lambda item: sum(item[1].values()))
    t = _tokens(plan, rows, seq_len)
    b = DTYPE_BYTES[activation_dtype]
    worst = list(_segments(plan, t, seq_len // plan.mesh.cp, b, imbalance, worst=True))
    recomputed = max((c.full_dispatch - c.kept.get("dispatch", 0) for c in worst), default=0)
    return Activations(tokens=t, phase=phase,
                       parts=tuple((p, parts.get(p, 0)) for p in PARTS),
                       dispatch_worst=_kept(worst)["dispatch"] + recomputed)
