"""Roles and facts a recogniser gives the modules of a model it knows (the planner's vocabulary).

>>> sorted(ROLES)[:3]
['attention', 'backbone', 'block']
"""

from __future__ import annotations

from typing import Literal, Protocol, get_args

from attrs import frozen
from torch import nn

Role = Literal["backbone", "block", "attention", "core_attention", "mixer", "moe", "router",
               "experts", "shared_experts", "dense_mlp", "embed", "lm_head", "mtp", "keep_fp32"]
ROLES: frozenset[Role] = frozenset(get_args(Role))
Fact = tuple[str, int | str | bool]


@frozen(kw_only=True)
class Recognition:
    family: str
    roles: dict[str, frozenset[Role]]
    facts: dict[str, tuple[Fact, ...]]


def group_facts(router: nn.Module) -> tuple[Fact, ...]:
    """``n_group`` and ``topk_group`` of a group-limited router (DeepSeek-V3: each token's top-k
    within its best ``topk_group`` of ``n_group`` expert groups; the reference model's and
    transformers' attribute names), or none.

    >>> class Gate(nn.Module):
    ...     num_group, topk_group, topk_method = 8, 4, "noaux_tc"
    >>> group_facts(Gate())
    (('n_group', 8), ('topk_group', 4))
    """
    groups = getattr(router, "n_group", getattr(router, "num_group", None))
    if not groups or int(groups) < 2 or getattr(router, "topk_method", "") == "greedy":
        return ()  # DeepSeek-V2's "greedy" ignores its groups
    return ("n_group", int(groups)), ("topk_group", int(getattr(router, "topk_group")))


class Recogniser(Protocol):
    name: str

    def recognise(self, model: nn.Module) -> Recognition | None: ...
