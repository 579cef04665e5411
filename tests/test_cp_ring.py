"""Ring (p2p) context parallelism on real gloo ranks: parity with one process, and its plan."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from tests.parity import Case, assert_parity, run_parity
from tests.ranks import RankPool, release_groups

RING = ("cp", (("comm", "p2p"),))
FSDP = ("fsdp", (("precision", "fp32"),))
CASES = {
    "ring cp=2": Case(mesh="dp_shard=2,cp=2", stages=(RING,)),
    "ring cp=4": Case(mesh="cp=4", stages=(RING, FSDP)),
}


def _run_cases(rank: int, world: int, cases: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for name, case in cases.items():
        out[name] = run_parity(rank, world, case)
        release_groups()
    return out


def test_ring_matches_one_process(ranks: Callable[[int], RankPool]) -> None:
    results = ranks(4).run(_run_cases, CASES)
    for name in CASES:
        for rank_results in results:
            assert_parity(rank_results[name])
