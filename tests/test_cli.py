"""The command line: plan output, JSON, exit codes, and the demo's JSON report."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from moefn.cli import main


def test_plan_prints_the_diff(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--model", "tiny", "--mesh", "dp_shard=4,ep=2"]) == 0
    out = capsys.readouterr().out
    assert "dispatch all_to_all over ep(2)" in out and "lines after collapsing" in out
    assert "memory of rank 0" in out and "communication per step" in out


def test_plan_json_lists_steps_problems_and_world(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--model", "tiny", "--mesh", "dp_shard=4,ep=2", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["world_size"] == 4 and doc["problems"] == []
    assert {s["record"] for s in doc["steps"]} == {"DistributeParams", "InstallDispatch",
                                                  "FullyShard"}
    assert doc["memory"]["optimizer_name"] == "adamw"
    assert doc["memory"]["optimizer"] == {k: 2 * v for k, v in doc["memory"]["params"].items()}
    assert {(c["op"], tuple(c["axes"])) for c in doc["comm"]} >= {("all_to_all", ("ep",)),
                                                                ("all_gather", ("dp_shard_cp",))}


def test_plan_memory_follows_the_optimizer(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--model", "tiny", "--mesh", "dp_shard=4", "--optimizer", "sgd"]) == 0
    out = capsys.readouterr().out
    assert "memory of rank 0 (sgd states in the parameter dtype)" in out
    assert main(["plan", "--model", "tiny", "--mesh", "dp_shard=4", "--optimizer", "sgd",
                 "--json"]) == 0
    assert set(json.loads(capsys.readouterr().out)["memory"]["optimizer"].values()) == {0}


def test_plan_with_problems_exits_1(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--model", "tiny", "--mesh", "dp_shard=3,ep=3", "--json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert [p["path"] for p in doc["problems"]] == ["layers.0.mlp.experts",
                                                     "layers.1.mlp.experts"]
    assert main(["plan", "--model", "tiny", "--mesh", "dp_shard=3,ep=2"]) == 1
    assert "ep must divide" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [
    ["plan", "--model", "tiny", "--mesh", "dp_shard:4"],
    ["plan", "--model", "gpt-7", "--mesh", "dp_shard=4"],
    ["plan", "--mesh", "dp_shard=4"],
    ["fly"],
])
def test_usage_errors_exit_2(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2


def test_full_size_preset_plans_on_the_meta_device(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--model", "deepseek-v3", "--mesh", "dp_shard=1024,ep=64",
                 "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    experts = [s for s in doc["steps"] if s["record"] == "DistributeParams"]
    assert len(experts) == 59 and experts[0]["placements"] == [{"record": "Shard", "dim": 0}]
    assert doc["local_shapes"]["layers.3.mlp.experts.gate_up"] == [
        {"shape": [4, 448, 4096], "ranks": 1024}]


@pytest.mark.parametrize("micro_batches", [1, 2])
def test_demo_json_matches_one_process(micro_batches: int) -> None:
    out = subprocess.run([sys.executable, "-m", "moefn", "demo", "--nproc", "2", "--steps", "2",
                          "--micro-batches", str(micro_batches), "--json"],
                         capture_output=True, text=True, check=True, timeout=900)
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["nproc"] == 2 and len(report["losses"]) == 2
    assert report["micro_batches"] == micro_batches
    assert report["losses"][1] < report["losses"][0]  # it trains
    assert report["max_abs_loss_diff"] <= 1e-5


def test_compare_prints_step_memory_and_comm_deltas(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--model", "tiny", "--compare", "dp_shard=4,ep=2",
                 "dp_shard=4,ep=4"]) == 0
    out = capsys.readouterr().out
    assert "~ layers.*.mlp.experts ×2  dispatch all_to_all over ep(2): 8 experts, 4 per rank  ⇒  " \
           "dispatch all_to_all over ep(4): 8 experts, 2 per rank" in out
    assert "params    experts" in out and "ep dispatch + combine (ep)" in out
    with pytest.raises(SystemExit):
        main(["plan", "--model", "tiny", "--mesh", "dp_shard=4", "--compare", "a=1", "b=2"])
