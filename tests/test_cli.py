"""The command line: plan output, JSON, exit codes, and the demo's JSON report."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

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
    assert "memory of rank 0 (gradients and sgd's 0 states per parameter" in out
    assert main(["plan", "--model", "tiny", "--mesh", "dp_shard=4", "--optimizer", "sgd",
                 "--json"]) == 0
    assert set(json.loads(capsys.readouterr().out)["memory"]["optimizer"].values()) == {0}


def test_plan_with_problems_exits_1(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--model", "tiny", "--mesh", "dp_shard=3,ep=3", "--json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert [(p["path"], p["count"], p["paths"]) for p in doc["problems"]] == [
        ("layers.*.mlp.experts", 2, ["layers.0.mlp.experts", "layers.1.mlp.experts"])]
    assert main(["plan", "--model", "tiny", "--mesh", "dp_shard=3,ep=2"]) == 1
    assert "ep must divide" in capsys.readouterr().out


def test_a_problem_of_every_layer_prints_once(capsys: pytest.CaptureFixture[str]) -> None:
    """Mixtral's 8 experts on ep=32: one grouped problem for its 32 layers (text and JSON)."""
    pytest.importorskip("transformers")
    argv = ["plan", "--model", "hf-mixtral-8x7b", "--mesh", "dp_shard=32,ep=32"]
    assert main(argv) == 1
    out = capsys.readouterr().out
    assert out.startswith("32 problems:\n") and len(out.strip().splitlines()) == 2
    assert "  model.layers.*.mlp.experts ×32: " in out
    assert main([*argv, "--json"]) == 1
    (problem,) = json.loads(capsys.readouterr().out)["problems"]
    assert problem["count"] == 32 and problem["path"] == "model.layers.*.mlp.experts"
    assert problem["paths"] == [f"model.layers.{i}.mlp.experts" for i in range(32)]


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


def test_demo_json_matches_one_process() -> None:
    """The default demo (one micro-batch) as JSON; accumulation is the torchrun test's case."""
    micro_batches = 1
    out = subprocess.run([sys.executable, "-m", "moefn", "demo", "--nproc", "2", "--steps", "2",
                          "--json"],
                         capture_output=True, text=True, check=True, timeout=900)
    assert out.stdout.count("\n") == 1 and "step" not in out.stderr  # quiet under --json
    report = json.loads(out.stdout)
    assert report["nproc"] == 2 and len(report["losses"]) == 2
    assert report["micro_batches"] == micro_batches
    assert report["losses"][1] < report["losses"][0]  # it trains
    assert report["max_abs_loss_diff"] <= 1e-5


def test_demo_hierarchical_dispatch_matches_one_process() -> None:
    """2 ranks (cp 2 × ep 2) as 2 "nodes" of one rank: the plan says hierarchical, tokens
    cross nodes, losses as one process."""
    out = subprocess.run([sys.executable, "-m", "moefn", "demo", "--nproc", "2", "--steps", "2",
                          "--dispatch", "hierarchical", "--ranks-per-node", "1"],
                         capture_output=True, text=True, check=True, timeout=900).stdout
    assert "dispatch hierarchical over ep(2)" in out, out
    diffs = re.findall(r"^ +\d+ +\S+ +\S+ +(\S+)$", out, re.MULTILINE)
    assert len(diffs) == 2 and max(map(float, diffs)) <= 1e-5, out


@pytest.mark.parametrize(("argv", "says"), [
    (["--dispatch", "hierarchical"], "--dispatch hierarchical needs --ranks-per-node"),
    (["--dispatch", "hierarchical", "--ranks-per-node", "3"], "--ranks-per-node 3 does not divide ep=2"),
    (["--ranks-per-node", "2"], "--ranks-per-node 2 applies to --dispatch hierarchical only"),
])
def test_demo_ranks_per_node_usage_errors(argv: list[str], says: str,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--nproc", "2", *argv]) == 2
    assert says in capsys.readouterr().err


def test_compare_prints_step_memory_and_comm_deltas(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--model", "tiny", "--compare", "dp_shard=4,ep=2",
                 "dp_shard=4,ep=4"]) == 0
    out = capsys.readouterr().out
    assert "~ layers.*.mlp.experts ×2  dispatch all_to_all over ep(2): 8 experts, 4 per rank  ⇒  " \
           "dispatch all_to_all over ep(4): 8 experts, 2 per rank" in out
    assert "params    experts" in out and "ep dispatch + combine (ep)" in out
    # the units of `moefn plan`
    assert "params    experts         24.000 KiB →     24.000 KiB  (+0 B)" in out
    # uniform top-2 of 8: 11/14 of the ep=2 peer's tokens, 3·(1 − C(6,2)/C(8,2)) rows at ep=4;
    # rows carry their expert ids as one more fp32 column (two int16)
    assert re.search(r"ep dispatch \+ combine \(ep\) +1\.670 MiB → +2\.960 MiB  \(\+1\.290 MiB\)", out)
    with pytest.raises(SystemExit):
        main(["plan", "--model", "tiny", "--mesh", "dp_shard=4", "--compare", "a=1", "b=2"])


@pytest.mark.parametrize("argv", [["--help"], ["plan", "--help"]])
def test_help_answers_without_importing_torch(argv: list[str]) -> None:
    out = subprocess.run([sys.executable, "-X", "importtime", "-m", "moefn", *argv],
                         capture_output=True, text=True, check=True, timeout=120)
    assert "usage: moefn" in out.stdout
    imported = {line.rpartition("|")[2].strip() for line in out.stderr.splitlines()}
    assert "moefn.cli" in imported and "argparse" in imported
    assert not {m for m in imported if m.split(".")[0] == "torch"}


def test_preset_names_are_the_presets() -> None:
    from moefn.adapters.reference import PRESETS
    from moefn.adapters.transformers.presets import HF_PRESETS
    from moefn.names import HF_PRESET_NAMES, MODEL_PRESETS

    assert (MODEL_PRESETS, HF_PRESET_NAMES) == (tuple(PRESETS), tuple(HF_PRESETS))


def test_memory_rows_state_their_dtype(capsys: pytest.CaptureFixture[str]) -> None:
    """The reference model keeps fp32 masters (16 bytes per parameter with AdamW);
    --master-dtype bf16 keeps bf16 ones (8 bytes): half of every row."""
    argv = ["plan", "--model", "tiny", "--mesh", "dp_shard=4", "--json"]
    memory = {}
    for master in ("fp32", "bf16"):
        assert main([*argv, "--master-dtype", master]) == 0
        memory[master] = json.loads(capsys.readouterr().out)["memory"]
    assert set(memory["fp32"]["dtypes"].values()) == {"float32"}
    assert set(memory["bf16"]["dtypes"].values()) == {"bfloat16"}
    for part in ("params", "grads", "optimizer"):
        assert memory["fp32"][part] == {k: 2 * v for k, v in memory["bf16"][part].items()}
    assert main(argv[:-1] + ["--master-dtype", "bf16"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"\n  experts     bfloat16 +\d", out), out
    assert "FSDP's forward all-gathers add up to" in out


def test_simulate_shows_progress_unless_json(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["plan", "--model", "tiny", "--mesh", "dp_shard=8,ep=2", "--simulate"]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "simulating rank 0 (1/3) of 8 on a fake process group" in err
    assert "  rank 7: realized in" in err and "8 ranks' shards checked, 0 problems" in err
    assert main([*argv, "--json"]) == 0
    assert capsys.readouterr().err == ""


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="needs torchrun")
def test_torchrun_demo_prints_once_with_the_real_world() -> None:
    """2 ranks under torchrun: one plan, one header naming 2 ranks, the 2-rank mesh and the
    backend; micro-batches said; per-step progress once."""
    out = subprocess.run(["torchrun", "--nproc-per-node", "2", "-m", "moefn", "demo", "--steps",
                          "2", "--micro-batches", "2"],
                         capture_output=True, text=True, check=True, timeout=900)
    assert out.stdout.count("moefn plan: ") == 1
    header = "training 2 steps on 2 ranks (gloo, cpu), mesh dp_replicate=1,dp_shard=1,cp=2,ep=2"
    assert out.stdout.count(header) == 1, out.stdout
    assert "each step accumulates 2 micro-batches" in out.stdout
    assert out.stdout.count("accumulated 2 micro-batches per step") == 1
    assert "on 2 ranks, mesh dp_replicate=1,dp_shard=1,cp=2,ep=2" in out.stdout
    assert out.stderr.count("  step 2/2  loss") == 1


def test_plan_composes_every_stage_the_flags_ask_for(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["plan", "--model", "tiny", "--mesh", "dp_shard=2,cp=2,ep=2", "--seq-len", "32",
            "--rows", "3", "--ac", "selective", "--json"]
    assert main(argv) == 0
    doc = json.loads(capsys.readouterr().out)
    records = {s["record"] for s in doc["steps"]}
    assert {"ContextParallelAttention", "DistributeParams", "Checkpoint", "FullyShard"} <= records
    assert {s["mode"] for s in doc["steps"] if s["record"] == "Checkpoint"} == {"selective"}
    assert doc["tokens_per_rank"] == 3 * 32 // 2
    assert any(c["collective"].startswith("cp K/V") for c in doc["comm"])


def test_plan_counts_a_tp_groups_tokens_once(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["plan", "--model", "tiny", "--mesh", "dp_shard=2,cp=2,tp=2", "--seq-len", "32",
            "--rows", "3"]
    assert main([*argv, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["tokens_per_rank"] == 3 * 32 // 2 // 2
    assert main(argv) == 0
    assert "48 tokens per tp group, 24 per rank" in capsys.readouterr().out


@pytest.mark.parametrize(("argv", "says"), [
    (["--mesh", "dp_shard=2,cp=2"], "add --seq-len"),
    (["--mesh", "dp_shard=4", "--seq-len", "8", "--tokens", "8"], "not both"),
    (["--compare", "dp_shard=4", "dp_shard=2,cp=2:ac=full"], "add --seq-len"),
])
def test_cp_without_a_sequence_length_is_a_usage_error(
        argv: list[str], says: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--model", "tiny", *argv]) == 2
    assert says in capsys.readouterr().err


def test_compare_counts_the_tokens_the_flags_give(capsys: pytest.CaptureFixture[str]) -> None:
    """--compare's communication is that of `moefn plan` with the same micro-batch flags (it
    once estimated every side at 4096 tokens whatever --seq-len and --rows said)."""
    from moefn.analyse.render import format_bytes

    flags = ["--seq-len", "32", "--rows", "3"]
    assert main(["plan", "--model", "tiny", "--mesh", "dp_shard=2,cp=2,ep=2", *flags,
                 "--json"]) == 0
    comm = {c["collective"]: c["received"] for c in json.loads(capsys.readouterr().out)["comm"]}
    assert main(["plan", "--model", "tiny", "--compare", "dp_shard=4,ep=2",
                 "dp_shard=2,cp=2,ep=2", *flags]) == 0
    out = capsys.readouterr().out
    for name in ("ep dispatch + combine", "cp K/V all-gather"):
        line = next(x for x in out.splitlines() if x.lstrip().startswith(name))
        assert f"→ {format_bytes(comm[name]):>14}" in line, (line, comm[name])


def test_compare_sides_take_their_own_options(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--model", "tiny", "--compare", "dp_shard=4,ep=2:ac=full",
                 "dp_shard=2,cp=2,ep=2:ac=router,seq_len=64,dispatch=all_gather"]) == 0
    out = capsys.readouterr().out
    assert "mode=full" in out and "mode=router" in out, out
    assert "cp K/V all-gather" in out and "all_gather" in out
    with pytest.raises(SystemExit) as exit_info:
        main(["plan", "--model", "tiny", "--compare", "dp_shard=4:rows=0", "dp_shard=4"])
    assert exit_info.value.code == 2


def test_plan_shows_hierarchical_hops_beside_their_lower_bounds(
        capsys: pytest.CaptureFixture[str]) -> None:
    """The inter-node hop's bytes and lower bound (one row per (token, destination node)) on
    their own rows, within-node ones apart; JSON says which hop each record is."""
    argv = ["plan", "--model", "tiny", "--mesh", "dp_shard=4,ep=4", "--dispatch", "hierarchical",
            "--ranks-per-node", "2"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "dispatch hierarchical over ep(4): 8 experts, 2 per rank, 2 ranks per node" in out
    # 2 nodes of 4 experts: the bytes of the flat dispatch over ep=2 (test_compare_...)
    assert re.search(r"\n  ep dispatch \+ combine across nodes +ep +8 +1\.670 MiB +1\.571 MiB\n", out)
    assert re.search(r"\n  ep dispatch \+ combine within node +ep +8 +[\d.]+ MiB +[\d.]+ MiB\n", out)
    assert "one row per (token, destination node)\n  across nodes" in out
    assert main([*argv, "--json"]) == 0
    hops = {c["collective"]: c["hop"] for c in json.loads(capsys.readouterr().out)["comm"]
            if c["op"] == "all_to_all"}
    assert set(hops.values()) == {"across nodes", "within node"} and len(hops) == 4, hops  # counts, rows


@pytest.mark.parametrize(("argv", "says"), [
    (["--dispatch", "hierarchical"], "--dispatch hierarchical needs --ranks-per-node (ranks_per_"
                                     "node=... on a --compare side): use --ranks-per-node in "
                                     "(1, 2, 4) (GPUs per node, dividing ep=4)"),
    (["--dispatch", "hierarchical", "--ranks-per-node", "3"],
     "--ranks-per-node 3 does not divide ep=4: use --ranks-per-node in (1, 2, 4)"),
    (["--ranks-per-node", "2"], "--ranks-per-node 2 applies to --dispatch hierarchical only "
                                "(got --dispatch all_to_all): add --dispatch hierarchical"),
])
def test_ranks_per_node_mistakes_are_usage_errors(
        argv: list[str], says: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--model", "tiny", "--mesh", "dp_shard=4,ep=4", *argv]) == 2
    assert says in capsys.readouterr().err


def test_ranks_per_node_is_a_whole_number(capsys: pytest.CaptureFixture[str]) -> None:
    for value in ("0", "two"):
        with pytest.raises(SystemExit) as exit_info:
            main(["plan", "--model", "tiny", "--mesh", "dp_shard=4,ep=4", "--dispatch",
                  "hierarchical", "--ranks-per-node", value])
        assert exit_info.value.code == 2
        assert (f"argument --ranks-per-node: expected a whole number of at least 1, got "
                f"{value!r}") in capsys.readouterr().err


def test_compare_takes_hierarchical_sides(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--model", "tiny", "--compare", "dp_shard=4,ep=4",
                 "dp_shard=4,ep=4:dispatch=hierarchical,ranks_per_node=2"]) == 0
    out = capsys.readouterr().out
    assert "dispatch hierarchical over ep(4): 8 experts, 2 per rank, 2 ranks per node" in out
    assert "ep dispatch + combine across nodes (ep)" in out
    assert main(["plan", "--model", "tiny", "--compare", "dp_shard=4,ep=4",
                 "dp_shard=4,ep=4:dispatch=hierarchical"]) == 2
    assert "ranks_per_node=... on a --compare side" in capsys.readouterr().err


def test_readme_sample_output_is_what_plan_prints(capsys: pytest.CaptureFixture[str]) -> None:
    """README's "See before you launch" block: every line is (the start of) a line of the output."""
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    command = ("moefn plan --model deepseek-v3 --mesh dp_shard=1024,ep=64 --seq-len 4096 --ac\n"
               "full --gpu-memory 80GiB")
    assert command in readme
    start = readme.index("```text\n", readme.index(command)) + len("```text\n")
    sample = readme[start:readme.index("```", start)].splitlines()
    assert main(command.split()[1:]) == 0
    printed = capsys.readouterr().out.splitlines()
    stale = [line for line in sample
             if line not in ("…", "") and not any(p.startswith(line) for p in printed)]
    assert not stale, stale
