"""Roles and facts a recogniser gives the modules of a model it knows (the planner's vocabulary).

>>> sorted(ROLES)[:3]
['attention', 'backbone', 'block']
"""

from __future__ import annotations

from typing import Literal, Protocol, get_args

from attrs import frozen
from torch import nn

Role = Literal["backbone", "block", "attention", "core_attention", "mixer", "moe", "router",
               "experts", "shared_experts", "embed", "lm_head", "mtp", "keep_fp32"]
ROLES: frozenset[Role] = frozenset(get_args(Role))
Fact = tuple[str, int | str | bool]


@frozen(kw_only=True)
class Recognition:
    family: str
    roles: dict[str, frozenset[Role]]
    facts: dict[str, tuple[Fact, ...]]


class Recogniser(Protocol):
    name: str

    def recognise(self, model: nn.Module) -> Recognition | None: ...
