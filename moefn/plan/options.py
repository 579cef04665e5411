"""Stage options: what `plan_cp`, `plan_tp`, `plan_ep`, `plan_ac` and `plan_fsdp` were called with.

Each stage holds one of these frozen records and the plan it makes records it
(``ShardPlan.options``), so a plan says how it was made and can be made again with
``compose(*stages_from(plan.options))``. The records hold what they are given; the stage reports
a bad value (naming the option, the value and the fix) when it runs.

>>> EPOptions(dispatch="all_gather") == EPOptions(dispatch="all_gather")
True
>>> EPOptions(dispatch="hierarchical", ranks_per_node=8)
EPOptions(dispatch='hierarchical', ranks_per_node=8)
>>> EPOptions.stage
'ep'
"""

from __future__ import annotations

from typing import ClassVar, Literal

from attrs import frozen

STAGE_ORDER = ("cp", "tp", "ep", "ac", "fsdp")
StageName = Literal["cp", "tp", "ep", "ac", "fsdp"]

CpComm = Literal["all_gather", "p2p"]
CP_COMMS: tuple[CpComm, ...] = ("all_gather", "p2p")
Dispatch = Literal["all_to_all", "all_gather", "hierarchical"]
Mode = Literal["router", "full", "selective", "none"]
Precision = Literal["bf16", "fp32"]


@frozen(kw_only=True)
class CPOptions:
    """`plan_cp`: ``seq_len`` (checked at plan time if given) and how K/V travel (``comm``)."""

    stage: ClassVar[StageName] = "cp"
    seq_len: int | None = None
    comm: CpComm = "all_gather"


@frozen(kw_only=True)
class TPOptions:
    """`plan_tp`: no choices yet (attention, dense MLPs, embedding and lm_head are split over
    ``tp``, the rest runs on each tp rank's own tokens)."""

    stage: ClassVar[StageName] = "tp"


@frozen(kw_only=True)
class EPOptions:
    """`plan_ep`: the token ``dispatch``; ``ranks_per_node`` for hierarchical dispatch only."""

    stage: ClassVar[StageName] = "ep"
    dispatch: Dispatch = "all_to_all"
    ranks_per_node: int | None = None


@frozen(kw_only=True)
class ACOptions:
    """`plan_ac`: the checkpoint ``mode``, block globs to ``skip``, and ``every`` n-th block."""

    stage: ClassVar[StageName] = "ac"
    mode: Mode = "router"
    skip: tuple[str, ...] = ()
    every: int = 1


@frozen(kw_only=True)
class FSDPOptions:
    """`plan_fsdp`: precision and the ``fully_shard`` choices (see `plan_fsdp`)."""

    stage: ClassVar[StageName] = "fsdp"
    precision: Precision = "bf16"
    reshard_after_forward: bool = True
    offload: bool = False
    lm_head_precision: Precision | None = None
    wrap_outer_model: bool = True
    shard_frozen: bool = False


StageOptions = CPOptions | TPOptions | EPOptions | ACOptions | FSDPOptions
