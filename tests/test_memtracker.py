"""The memory estimate agrees with torch's own FSDP2 memory tracker at 1024 fake ranks.

A DeepSeek-V3-wide model (its dense layers + 3 MoE layers + MTP) is planned with
``plan_ep() + plan_fsdp()`` on ``dp_shard=1024,ep=64`` and realized, in a subprocess, on a fake
process group as rank 0 and rank 1023. Its parameters are then materialized as fake tensors and
one AdamW step runs under ``FSDPMemTracker``, which attributes every tensor *storage* to a
category. The test compares, per rank, what is left after the step with `estimate_memory`:

* ``Sharded Param`` and ``Sharded Grad``: FSDP2 keeps each shard in a storage padded to the size
  of shard 0 (a rank past the last row still holds a padded shard), and the gradients are views
  of the padded reduce-scatter output; the estimate counts what is allocated, padding included:
  exact equality, no tolerance (rank 1023 holds 7,397,376 bytes of padding here).
* ``OptState``: ``exp_avg``/``exp_avg_sq`` are ``zeros_like`` of the unpadded local shard (the
  estimate's two state copies), plus AdamW's scalar ``step`` tensor per parameter (fp32 on CPU,
  4 bytes; not counted by the estimate): exact equality again.
* ``Buffer`` (routers' expert bias and token counters) is not part of the estimate; checked
  against the model spec so that nothing the tracker holds is unexplained.
* All-gathers: each unit's unshard in forward grows ``Unsharded Param`` by its own parameters,
  padded to ``shards * shard 0``, in the unit's param dtype; the most FSDP2 holds at once equals
  `Memory.gathered_peak` (the running unit, its parents and earlier units kept unsharded).

The model, its plan and the stand-ins fake tensors need (a balanced dispatcher, ``bincount``'s
shape, a fused attention kernel) come from `tests.fake_scale`; none changes which parameters,
gradients or optimizer states exist, nor their sizes.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from moefn.analyse.estimate import Memory, estimate_memory
from moefn.analyse.layout import fsdp_shard_numel, fsdp_shard_ranks, param_layouts
from moefn.plan.records import FullyShard, ShardPlan
from tests import fake_scale
from tests.fake_scale import RANKS

pytestmark = pytest.mark.slow  # a fake world of 1024 ranks: minutes; `nox -s tests_slow`

STEP_BYTES = 4  # AdamW's per-parameter `step`: torch.tensor(0.0), fp32 on CPU (not capturable/fused)


# ---- subprocess side: realize on a fake process group and measure with FSDPMemTracker ----------


def _measure(rank: int) -> dict[str, Any]:
    from torch.distributed._tools.fsdp2_mem_tracker import (
        FSDPMemTracker,
        _FSDPModState,
        _FSDPRefType,
    )

    from moefn.adapters.reference import causal_lm_loss

    cpu = torch.device("cpu")
    with fake_scale.fake_realized(rank) as model:
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        input_ids = torch.randint(0, model.config.vocab_size, (1, 8))
        position_ids = torch.arange(8).expand(1, 8).contiguous()
        tracker = FSDPMemTracker(model, optimizer)
        tracker.track_inputs((input_ids, position_ids))
        with tracker:
            loss = causal_lm_loss(model(input_ids, position_ids), input_ids, input_ids.numel())
            loss.backward()  # type: ignore[no-untyped-call]
            optimizer.step()
            final = tracker.get_tracker_snapshot()[cpu]
    # (the tracker's "peak" is unusable here: DTensor's sharding propagation runs global-shape
    # ops inside the same FakeTensorMode and the tracker counts them, e.g. 90 GB of OptState;
    # tests.test_memory_at_scale filters them)
    unshard: dict[str, int] = {}
    peak = dict.fromkeys(("Unsharded Param", "All Gather"), 0)
    for stats in tracker.memory_tracking.values():  # type: ignore[no-untyped-call]
        path = stats.mod_fqn.partition(".")[2]  # drop the root class name
        before, after = (stats.snapshots[state][0].get(cpu, {})
                         for state in (_FSDPModState.BEF_PRE_FW, _FSDPModState.AFT_PRE_FW))
        unshard[path] = (after.get(_FSDPRefType.UNSHARDED_PARAM, 0)
                         - before.get(_FSDPRefType.UNSHARDED_PARAM, 0))
        for snaps in stats.snapshots.values():
            for snap in snaps:
                for ref in (_FSDPRefType.UNSHARDED_PARAM, _FSDPRefType.ALL_GATHER):
                    peak[ref.value] = max(peak[ref.value], snap.get(cpu, {}).get(ref, 0))
    return {"final": {str(getattr(k, "value", k)): v for k, v in final.items()},
            "unshard": unshard, "peak": peak}


# ---- pytest side: predictions from the plan alone ------------------------------------------------


def _bytes(dtype: str) -> int:
    return int(getattr(torch, dtype).itemsize)


def _unit_gathers(plan: ShardPlan) -> dict[str, int]:
    """Unit → bytes its own parameters take unsharded (padded), in its param dtype."""
    units = {u.path: u for u in plan.steps_of(FullyShard)}
    dtypes = {t.name: t.dtype for t in plan.model.tensors}
    out: dict[str, int] = {}
    for name, layout in param_layouts(plan).items():
        if layout.unit is None:
            continue
        unit = units[layout.unit]
        numel = fsdp_shard_numel(layout, unit, plan.mesh)[0] * fsdp_shard_ranks(unit, plan.mesh)
        out[unit.path] = out.get(unit.path, 0) + numel * _bytes(unit.param_dtype or dtypes[name])
    return out


def _total(part: tuple[tuple[str, int], ...]) -> int:
    return sum(v for _, v in part)


@pytest.fixture(scope="module")
def plan() -> ShardPlan:
    return fake_scale.plan()


@pytest.fixture(scope="module")
def measured() -> dict[int, dict[str, Any]]:
    code = ("import json; from tests.test_memtracker import _measure; "
            f"print(json.dumps({{r: _measure(r) for r in {RANKS!r}}}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=600, cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    return {int(k): v for k, v in json.loads(out.stdout.splitlines()[-1]).items()}


@pytest.mark.parametrize("rank", RANKS)
def test_sharded_state_matches_the_tracker(plan: ShardPlan, measured: dict[int, dict[str, Any]],
                                           rank: int) -> None:
    memory: Memory = estimate_memory(plan, rank, optimizer="adamw")
    final = measured[rank]["final"]
    trainable = sum(1 for t in plan.model.tensors if t.requires_grad and not t.is_buffer)
    buffers = sum(t.numel * _bytes(t.dtype) for t in plan.model.tensors if t.is_buffer)
    want = {"Sharded Param": _total(memory.params),
            "Sharded Grad": _total(memory.grads),
            "OptState": _total(memory.optimizer) + STEP_BYTES * trainable,
            "Buffer": buffers}
    assert {k: final[k] for k in want} == want, (rank, final)


def test_each_unit_gathers_its_padded_parameters(plan: ShardPlan,
                                                 measured: dict[int, dict[str, Any]]) -> None:
    want = _unit_gathers(plan)
    for rank in RANKS:
        assert measured[rank]["unshard"] == want, rank


def test_gathered_peak_is_what_fsdp_holds_at_once(plan: ShardPlan,
                                                  measured: dict[int, dict[str, Any]]) -> None:
    """The peak comes while the MTP block's experts run: lm_head is not resharded after forward,
    so it stays gathered under the MTP block, its experts and the root."""
    peak = estimate_memory(plan, 0).gathered_peak
    assert peak > max(_unit_gathers(plan).values())
    for rank in RANKS:
        assert measured[rank]["peak"]["Unsharded Param"] == peak, rank
