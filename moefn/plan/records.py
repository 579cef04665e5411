"""ShardPlan and its step records: what each stage decided, as plain frozen data.

Step kinds, in the order realize applies them (CP → TP → EP → AC → FSDP):

- `ContextParallelAttention`: a core attention sees the whole sequence's K/V over ``cp``
  (head-tail layout), all-gathered or passed around the ring (``comm="p2p"``);
- `TensorParallel`: a module's part in tensor parallelism over ``tp`` (its ``style``);
- `DistributeParams`: parameters of a module become DTensors with placements on mesh axes;
- `InstallDispatch`: an experts module sends tokens to the ranks that own their experts;
- `SyncGradients`: gradients of a module all-reduce (sum) over data-parallel axes, without FSDP;
- `KeepDtype`: parameters FSDP leaves alone to keep their dtype (an fp32 ``A_log`` on a bf16
  mixer), their gradients all-reduced (sum) in that dtype over data-parallel axes;
- `ActivationCheckpoint`: a block is wrapped for activation checkpointing (plan JSON names it
  ``"Checkpoint"``, as before the rename);
- `FullyShard`: a module becomes one `fully_shard` unit with its options.

>>> spec = ModelSpec(family="demo", root_class="Demo", modules=(), tensors=(), tied=())
>>> plan = ShardPlan.empty(spec, MeshSpec(dp_shard=2))
>>> plan.add_steps([FullyShard(stage="fsdp", path="", mesh_dims=("dp_shard_cp",))]).steps
(FullyShard(stage='fsdp', path='', mesh_dims=('dp_shard_cp',), shard_dim=0, ...),)
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal, TypeVar, get_args

from attrs import evolve, field, frozen

from moefn.plan.mesh import Axis, MeshSpec
from moefn.plan.options import STAGE_ORDER as STAGE_ORDER
from moefn.plan.options import CpComm as CpComm
from moefn.plan.options import Dispatch, StageOptions
from moefn.plan.options import StageName as StageName
from moefn.plan.spec import ModelSpec


@frozen
class Shard:
    dim: int

    def __str__(self) -> str:
        return f"Shard({self.dim})"


@frozen
class Replicate:
    def __str__(self) -> str:
        return "Replicate()"


Placement = Shard | Replicate


@frozen(kw_only=True)
class ContextParallelAttention:
    """``comm``: K/V all-gathered (``"all_gather"``) or sent block by block around the cp ring
    (``"p2p"``)."""

    stage: StageName
    path: str
    mesh_dims: tuple[Axis, ...]
    layout: Literal["head_tail"] = "head_tail"
    seq_len: int | None = None
    comm: CpComm = "all_gather"


TPStyle = Literal["gather", "colwise", "rowwise", "replicate", "vocab_embed", "vocab_head"]
"""``gather``: an attention or dense MLP all-gathers its input's sequence over tp (backward:
reduce-scatter); ``colwise``/``rowwise``: a linear sharded on its output/input features
(rowwise reduce-scatters its partial sums back to sequence shards); ``replicate``: a linear
inside a gathered module kept whole on every tp rank (MLA's latent projections; K/V projections
whose heads do not divide by tp, which compute only the heads the rank's queries read), its
gradient summed over tp; ``vocab_embed``/``vocab_head``: embedding and lm_head sharded on the vocabulary
(the logits stay vocabulary-sharded for the loss). Sharded parameters get a `DistributeParams`
step on ``tp`` too."""


@frozen(kw_only=True)
class TensorParallel:
    """How a module runs under tensor parallelism (``style``, see `TPStyle`)."""

    stage: StageName
    path: str
    style: TPStyle
    mesh_dims: tuple[Axis, ...] = ("tp",)
    #: a replicated K/V projection's ``(n_heads, n_kv_heads)``: each rank computes the K/V heads
    #: its query heads read (`moefn.plan.tp_heads.kv_heads_read`)
    kv_heads: tuple[int, int] | None = None


@frozen(kw_only=True)
class DistributeParams:
    stage: StageName
    path: str
    params: tuple[str, ...]
    mesh_dims: tuple[Axis, ...]
    placements: tuple[Placement, ...]


@frozen(kw_only=True)
class InstallDispatch:
    stage: StageName
    path: str
    kind: Dispatch
    mesh_dims: tuple[Axis, ...]
    num_experts: int
    ranks_per_node: int | None = None  # hierarchical: consecutive ep ranks sharing a node


@frozen(kw_only=True)
class SyncGradients:
    stage: StageName
    path: str
    mesh_dims: tuple[Axis, ...]


@frozen(kw_only=True)
class KeepDtype:
    """Parameters ``params`` held directly by ``path`` stay unsharded in ``dtype``: every FSDP unit
    above them ignores them (``ignored_params``; they sit beside parameters of another compute
    dtype, so no unit of their own fits), and their gradients all-reduce (sum) over ``mesh_dims``."""

    stage: StageName
    path: str
    params: tuple[str, ...]
    dtype: str
    mesh_dims: tuple[Axis, ...]


@frozen(kw_only=True)
class ActivationCheckpoint:
    """Activation checkpointing of a block; ``saves`` names what recompute reuses."""

    stage: StageName
    path: str
    mode: Literal["full", "router", "selective"]
    saves: tuple[str, ...] = ()


@frozen(kw_only=True)
class FullyShard:
    """One ``fully_shard`` unit. ``param_dtype``/``reduce_dtype`` of None keep the parameter dtype."""

    stage: StageName
    path: str
    mesh_dims: tuple[Axis, ...]
    shard_dim: int = 0
    reshard_after_forward: bool = True
    param_dtype: str | None = None
    reduce_dtype: str | None = None
    offload: bool = False
    ignored: tuple[str, ...] = ()  # full parameter names this unit (and its parents) leave alone


Step = (ContextParallelAttention | TensorParallel | DistributeParams | InstallDispatch
        | SyncGradients | KeepDtype | ActivationCheckpoint | FullyShard)
"""Every step kind, listed once here, in the order realize applies them."""
STEP_KINDS: tuple[type[Step], ...] = get_args(Step)

S = TypeVar("S", bound=Step)


def _step_sort_key(step: Step) -> tuple[int, int]:
    return STAGE_ORDER.index(step.stage), STEP_KINDS.index(type(step))


@frozen(kw_only=True)
class ShardPlan:
    """The composed decisions of every stage for one model on one mesh.

    ``options`` are the applied stages' options, one per name in ``stages`` (a plan read from a
    version-1 file has none: those files did not record them)."""

    model: ModelSpec
    mesh: MeshSpec
    stages: tuple[StageName, ...] = ()
    options: tuple[StageOptions, ...] = ()
    steps: tuple[Step, ...] = field(default=())

    @classmethod
    def empty(cls, model: ModelSpec, mesh: MeshSpec) -> ShardPlan:
        return cls(model=model, mesh=mesh)

    def add_steps(self, steps: Iterable[Step]) -> ShardPlan:
        """A new plan with ``steps`` merged in (stable order: by stage, then by step kind)."""
        return evolve(self, steps=tuple(sorted((*self.steps, *steps), key=_step_sort_key)))

    def with_stage(self, options: StageOptions) -> ShardPlan:
        """A new plan that records the stage of ``options`` as applied, with its options."""
        return evolve(self, stages=(*self.stages, options.stage), options=(*self.options, options))

    def steps_of(self, kind: type[S]) -> tuple[S, ...]:
        return tuple(s for s in self.steps if isinstance(s, kind))

    def distributed_params(self) -> dict[str, DistributeParams]:
        """Full parameter name → the DistributeParams step that placed it."""
        out: dict[str, DistributeParams] = {}
        for step in self.steps:
            if isinstance(step, DistributeParams):
                for name in step.params:
                    out[f"{step.path}.{name}" if step.path else name] = step
        return out

    def tp_sharded_paths(self) -> tuple[str, ...]:
        """Modules whose parameters `plan_tp` shards over tp (DTensors on the tp axis)."""
        return tuple(s.path for s in self.steps_of(DistributeParams) if "tp" in s.mesh_dims)
