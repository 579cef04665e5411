"""`moefn calibrate` measures real gloo collectives and writes a profile --hardware accepts."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import pytest

from moefn import PlanError
from moefn.analyse.steptime import OPS, load_profile
from moefn.calibrate import calibrate
from moefn.cli import main


def test_calibrated_profile_loads_with_every_collective(tmp_path: Path) -> None:
    data = calibrate(nproc=2, matmul_size=64, repeat=3, busy_s=0.1)
    path = tmp_path / "here.json"
    path.write_text(json.dumps(data))
    profile = load_profile(str(path))
    assert profile.calibrated and profile.op_overhead_s > 0 and profile.op_bytes_per_s > 0
    # selective checkpointing's per-op policy costs more per op than full recompute's
    assert 0 <= profile.checkpoint_op_s < profile.selective_op_s
    assert 0 <= profile.overlap <= 1
    assert set(profile.intra_node) == set(OPS)
    assert all(link.latency_s > 0 for link in profile.intra_node.values())
    assert profile.flops("float32") > 0


def test_cli_writes_the_profile(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The real measurement, shortened (the default spends seconds per figure)."""
    import moefn.calibrate

    monkeypatch.setattr(moefn.calibrate, "calibrate", partial(
        calibrate, matmul_size=64, repeat=3, busy_s=0.1))
    out = tmp_path / "p.json"
    assert main(["calibrate", "--nproc", "2", "--out", str(out)]) == 0
    assert load_profile(str(out)).calibrated


@pytest.mark.parametrize(("given", "path"), [({"nproc": 1}, "nproc"), ({"repeat": 0}, "repeat")])
def test_calibrate_refuses_before_starting_ranks(given: dict[str, int], path: str) -> None:
    """One rank has no peer: gloo failed with 'Pair is not connected' after seconds of work."""
    with pytest.raises(PlanError) as info:
        calibrate(**{"nproc": 2, **given})
    assert info.value.problems[0].path == path
