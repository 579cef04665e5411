"""Checked by mypy in tests/test_typing.py: the public edge is Result[ShardPlan, PlanError]."""

from typing import assert_type

import torch
from returns.result import Result

from moefn import MeshSpec, PlanError, ShardPlan, compose, plan_ep, plan_fsdp
from moefn.adapters.reference import MoETransformer, get_preset

with torch.device("meta"):
    model = MoETransformer(get_preset("tiny"))
result = compose(plan_ep(), plan_fsdp())(model, MeshSpec(dp_shard=4, ep=2))
assert_type(result, Result[ShardPlan, PlanError])
assert_type(plan_ep()(result.unwrap()), Result[ShardPlan, PlanError])
