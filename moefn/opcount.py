"""The aten ops one training pass of a model dispatches, counted on a meta copy (`count_ops`).

The step-time model (`moefn.analyse.steptime`) charges every dispatched op a fixed cost plus the
elements it reads and writes; this module counts them. A bf16 copy of the model runs forward,
the loss and backward on meta tensors under a counting ``TorchDispatchMode`` (bf16: the grouped
experts kernel runs on meta only in bf16; an fp32 model dispatches a few casts fewer). Ops are
split by where they run: in a checkpointed region (every block and MTP block, as ``plan_ac``
wraps them: what AC recomputes) or not, and among a region's forward ops those selective AC
saves (`SELECTIVE_SAVED`: recomputed as a lookup). Views and matmuls (charged by their FLOPs)
move no elements here. Blocks alike (same class and parameter shapes) run once: the others
pass their input through and count as their representative. Ops with no meta kernel
(``bincount``) run on zeros on the CPU. Counted for one row; elements scale with rows (the
weights' share, which does not, is small); memoised per model and sequence length.

>>> import torch
>>> from moefn.adapters.reference import MoETransformer, get_preset
>>> with torch.device("meta"):
...     model = MoETransformer(get_preset("tiny"))
>>> ops = count_ops(model, seq_len=16)
>>> ops.backward.ops > ops.forward.ops > ops.checkpointed.ops > ops.saved.ops > 0
True
"""

from __future__ import annotations

import copy
import weakref
from collections.abc import Callable
from typing import Any

import torch
from attrs import frozen
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map_only

from moefn.adapters.reference.transformer import causal_lm_loss
from moefn.plan.spec import inspect_model
from moefn.realize.activation_checkpointing import SELECTIVE_SAVED
from moefn.train.loop import Batch, causal_lm_outputs

MATMULS = frozenset(SELECTIVE_SAVED) | {
    torch.ops.aten.baddbmm.default, torch.ops.aten._grouped_mm.default,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward.default}


@frozen(kw_only=True)
class Ops:
    """Ops dispatched, and elements they read and write per row of the sequence length."""

    ops: int
    elements: int


@frozen(kw_only=True)
class OpCounts:
    """One micro-batch: forward (the loss included), backward, the forward of checkpointed
    regions (what AC recomputes), and of that what selective AC saves."""

    forward: Ops
    backward: Ops
    checkpointed: Ops
    saved: Ops


def _is_view(func: Any) -> bool:
    return any(r.alias_info is not None and not r.alias_info.is_write
               for r in func._schema.returns)


def _elements(tree: Any) -> int:
    return sum(t.numel() for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor))


class OpTally(TorchDispatchMode):  # type: ignore[no-untyped-call]  # untyped in torch
    """Counts (phase, in a region, saved) → [ops, elements], a region's ops times the blocks
    it stands for; runs ops without a meta kernel on CPU zeros."""

    def __init__(self, weights: dict[str, int]) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.weights, self.phase, self.region = weights, "forward", ""
        self.muted = False  # allocations `_Attention` stands for a kernel with
        self.counts: dict[tuple[str, bool, bool], list[int]] = {}

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        try:
            out = func(*args, **kwargs)
        except (NotImplementedError, RuntimeError):  # data-dependent: the shapes zeros give
            real = tree_map_only(torch.Tensor, lambda t: torch.zeros(t.shape, dtype=t.dtype),
                                 (args, kwargs))
            out = tree_map_only(torch.Tensor, lambda t: torch.empty_like(t, device="meta"),
                                func(*real[0], **real[1]))
        if func.namespace == "prim" or self.muted:
            return out
        matmul = _is_view(func) or func in MATMULS
        self.add(1, 0 if matmul else _elements((args, kwargs)) + _elements(out),
                 func in SELECTIVE_SAVED)
        return out

    def add(self, ops: int, elements: int, saved: bool = True) -> None:
        """Count ``ops`` moving ``elements``, times the blocks the region stands for."""
        weight = self.weights.get(self.region, 1)
        entry = self.counts.setdefault((self.phase, bool(self.region), saved), [0, 0])
        entry[0] += weight * ops
        entry[1] += weight * elements


class _Attention(torch.autograd.Function):
    """A fused attention kernel as it runs on devices (meta would decompose it into the math
    path, scores materialised): one op each way, charged by its FLOPs as matmuls are."""

    @staticmethod
    def forward(ctx: Any, counter: OpTally, q: torch.Tensor, k: torch.Tensor,
                v: torch.Tensor) -> torch.Tensor:
        ctx.counter, ctx.shapes = counter, (q.shape, k.shape, v.shape)
        counter.muted = True
        out = q.new_empty((*q.shape[:-1], v.shape[-1]))
        counter.muted = False
        counter.add(1, 0)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[None, torch.Tensor, torch.Tensor,
                                                         torch.Tensor]:
        ctx.counter.muted = True
        q, k, v = (grad.new_empty(s) for s in ctx.shapes)
        ctx.counter.muted = False
        ctx.counter.add(1, 0)
        return None, q, k, v


class _FusedAttention(TorchFunctionMode):
    """Scaled dot-product attention as `_Attention`."""

    def __init__(self, counter: OpTally) -> None:
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func: Any, types: Any, args: Any = (),
                           kwargs: Any = None) -> Any:
        if func is torch.nn.functional.scaled_dot_product_attention:
            return _Attention.apply(self.counter, *args[:3])  # type: ignore[no-untyped-call]
        return func(*args, **(kwargs or {}))


def _regions(model: nn.Module) -> tuple[dict[str, int], list[str]]:
    """Checkpointed region path → how many it stands for (a block kind's first: all of its
    kind), and the other blocks (they only pass their input through)."""
    spec = inspect_model(model)
    first: dict[tuple[object, ...], str] = {}
    weights: dict[str, int] = {}
    skipped = []
    for path in spec.paths_with("block"):
        block = model.get_submodule(path)
        kind = (type(block).__name__, tuple((n, p.shape) for n, p in block.named_parameters()))
        if kind in first:
            weights[first[kind]] += 1
            skipped.append(path)
        else:
            first[kind], weights[path] = path, 1
    return {**weights, **{p: 1 for p in spec.paths_with("mtp")}}, skipped


def _first_tensor(tree: Any) -> torch.Tensor | None:
    return next((t for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor)), None)


def _track(model: nn.Module, counter: OpTally) -> list[Any]:
    """Hooks that set ``counter.region`` while a region runs forward, and in backward from
    its output's gradient to its input's; the skipped blocks' forwards replaced."""
    last: list[Any] = []

    def at_grad(path: str, entering: bool) -> Callable[[torch.Tensor], None]:
        def hook(_: torch.Tensor) -> None:
            if entering or counter.region == path:  # a block's input is the last one's output
                counter.region = path if entering else ""
        return hook

    def pre(path: str) -> Callable[..., None]:
        def hook(_: nn.Module, args: Any) -> None:
            first = _first_tensor(args)
            if first is not None and first.requires_grad:
                first.register_hook(  # type: ignore[no-untyped-call]
                    at_grad(path, entering=False))
            counter.region = path
        return hook

    def post(path: str) -> Callable[..., None]:
        def hook(_: nn.Module, args: Any, out: Any) -> None:
            counter.region = ""
            last[:] = [out]
            first = _first_tensor(out)
            if first is not None and first.requires_grad:
                first.register_hook(  # type: ignore[no-untyped-call]
                    at_grad(path, entering=True))
        return hook

    def pass_through(*args: Any, **kwargs: Any) -> Any:
        out = last[0]
        return args[0] if isinstance(out, torch.Tensor) else type(out)((args[0], *out[1:]))

    handles = []
    for path in counter.weights:
        module = model.get_submodule(path)
        handles += [module.register_forward_pre_hook(pre(path)),
                    module.register_forward_hook(post(path))]
    _, skipped = _regions(model)
    for path in skipped:
        model.get_submodule(path).forward = pass_through
    return handles


def _run(model: nn.Module, seq_len: int) -> dict[tuple[str, bool, bool], list[int]]:
    """One forward, loss and backward of one row of ``seq_len`` tokens under `OpTally`."""
    counter = OpTally(_regions(model)[0])
    handles = _track(model, counter)
    ids = torch.zeros(1, seq_len, dtype=torch.long, device="meta")
    position = torch.arange(seq_len, device="meta")[None]
    with _FusedAttention(counter), counter:
        batch = Batch(input_ids=ids, position_ids=position, labels=ids)
        loss = causal_lm_loss(causal_lm_outputs(model, batch), ids, seq_len)
        counter.phase = "backward"
        loss.backward()  # type: ignore[no-untyped-call]
    for h in handles:
        h.remove()
    return counter.counts


def _ops(run: dict[tuple[str, bool, bool], list[int]],
         keep: Callable[[tuple[str, bool, bool]], bool]) -> Ops:
    return Ops(ops=sum(v[0] for k, v in run.items() if keep(k)),
               elements=sum(v[1] for k, v in run.items() if keep(k)))


_MEMO: weakref.WeakKeyDictionary[nn.Module, dict[int, OpCounts]] = weakref.WeakKeyDictionary()


def count_ops(model: nn.Module, seq_len: int) -> OpCounts:
    """`OpCounts` of ``model`` (on the meta device or not: a meta bf16 copy runs) for rows of
    ``seq_len`` tokens, memoised per model and length."""
    memo = _MEMO.setdefault(model, {})
    if seq_len not in memo:
        copied = copy.deepcopy(model).to(device="meta", dtype=torch.bfloat16)
        run = _run(copied, seq_len)
        memo[seq_len] = OpCounts(
            forward=_ops(run, lambda k: k[0] == "forward"),
            backward=_ops(run, lambda k: k[0] == "backward"),
            checkpointed=_ops(run, lambda k: k[0] == "forward" and k[1]),
            saved=_ops(run, lambda k: k[0] == "forward" and k[1] and k[2]))
    return memo[seq_len]
