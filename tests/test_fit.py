"""Will it fit? The peak in the JSON and text, the --gpu-memory check and its fixes, bad sizes."""

from __future__ import annotations

import json

import pytest

from moefn.cli import main

DEEPSEEK = ["plan", "--model", "deepseek-v3", "--mesh", "dp_shard=1024,ep=64", "--seq-len",
            "4096", "--json"]


def _plan_json(capsys: pytest.CaptureFixture[str], argv: list[str], code: int) -> dict[str, object]:
    assert main(argv) == code
    doc: dict[str, object] = json.loads(capsys.readouterr().out)
    return doc


def test_ac_full_fits_where_ac_none_does_not(capsys: pytest.CaptureFixture[str]) -> None:
    """The issue's done-when: no AC predicts a larger peak than full AC; a GPU between the two
    fails the plan without AC, naming an AC fix, and passes it with full AC."""
    none = _plan_json(capsys, [*DEEPSEEK, "--ac", "none"], 0)["memory"]
    full = _plan_json(capsys, [*DEEPSEEK, "--ac", "full"], 0)["memory"]
    assert isinstance(none, dict) and isinstance(full, dict)
    assert isinstance(none["peak"], int) and none["peak"] > full["peak"] > 0
    assert set(none["activations"]) == {"saved", "recompute", "dispatch", "cp_kv", "logits",
                                        "fsdp_buffers", "optimizer_temporaries"}
    assert none["peak_rank"] in (0, 1023)
    gpu = ["--gpu-memory", f"{(none['peak'] + full['peak']) // 2}B", "--reserve", "0B"]
    problems = _plan_json(capsys, [*DEEPSEEK, "--ac", "none", *gpu], 1)["problems"]
    assert isinstance(problems, list) and len(problems) == 1
    assert problems[0]["message"] == "predicted peak exceeds the GPU memory"
    assert "fixes that fit: " in problems[0]["fix"] and "ac=full" in problems[0]["fix"]
    assert "biggest parts: dispatch" in problems[0]["fix"]
    assert _plan_json(capsys, [*DEEPSEEK, "--ac", "full", *gpu], 0)["problems"] == []


def test_ring_cp_holds_less_kv_than_all_gather(capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 21's done-when: at 128k tokens and cp=4 the ring's K/V part (its own K/V, saved for
    backward) is a fraction of the all-gather's, and so is the whole peak."""
    argv = ["plan", "--model", "deepseek-v3", "--mesh", "dp_shard=256,cp=4,ep=64", "--seq-len",
            "131072", "--json", "--cp-comm"]
    ring, gather = (_plan_json(capsys, [*argv, comm], 0)["memory"] for comm in ("p2p", "all_gather"))
    assert isinstance(ring, dict) and isinstance(gather, dict)
    assert 4 * ring["activations"]["cp_kv"] < gather["activations"]["cp_kv"]
    assert ring["peak"] < gather["peak"]


def test_text_shows_the_activation_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--model", "tiny", "--mesh", "dp_shard=4,ep=2", "--seq-len", "256",
                 "--rows", "2", "--gpu-memory", "80GiB"]) == 0
    out = capsys.readouterr().out
    assert "activations of rank 0 at its peak (2 × 256 per micro-batch" in out
    assert "(all ep·top_k rows to this rank:" in out
    assert "fits in --gpu-memory 80.000 GiB minus --reserve 8.000 GiB" in out


def test_fixes_are_re_estimated_layouts(capsys: pytest.CaptureFixture[str]) -> None:
    """Each fix shows the peak of the plan it names, as that plan's own estimate gives it."""
    from moefn.analyse.render import format_bytes

    argv = ["plan", "--model", "tiny", "--mesh", "dp_shard=2", "--seq-len", "4096", "--rows",
            "8", "--json"]
    peak = _plan_json(capsys, argv, 0)["memory"]["peak"]  # type: ignore[index]
    fix = _plan_json(capsys, [*argv, "--gpu-memory", f"{int(peak * 0.7)}B", "--reserve", "0%"],
                     1)["problems"][0]["fix"]  # type: ignore[index]
    for change, option in (("ac=full", ["--ac", "full"]), ("ac=selective", ["--ac", "selective"])):
        other = _plan_json(capsys, [*argv, *option], 0)["memory"]["peak"]  # type: ignore[index]
        assert f"{change} ({format_bytes(other)})" in fix
    rows = _plan_json(capsys, [*argv[:-3], "--rows", "1", "--json", "--gpu-memory",
                               f"{int(peak * 0.01)}B"], 1)["problems"][0]["fix"]  # type: ignore[index]
    assert "no single change fits; closest: " in rows


@pytest.mark.parametrize(("flag", "value", "says"), [
    ("--gpu-memory", "80XB", "'80XB' is not a size: use a number and one of B, KB, MB, GB, TB, "
                             "KiB, MiB, GiB, TiB"),
    ("--gpu-memory", "GiB", "'GiB' is not a size"),
    ("--reserve", "100%", "leaves nothing"),
    ("--imbalance", "0.5", "at least 1"),
])
def test_bad_sizes_exit_2_naming_the_value(capsys: pytest.CaptureFixture[str], flag: str,
                                           value: str, says: str) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["plan", "--model", "tiny", "--mesh", "dp_shard=2", flag, value])
    assert exit_info.value.code == 2
    assert says in capsys.readouterr().err


def _tiny_plan(mesh: str, *stages: object) -> object:
    import torch

    from moefn import MeshSpec, compose
    from moefn.adapters.reference import MoETransformer, get_preset

    with torch.device("meta"):
        model = MoETransformer(get_preset("tiny"))
    return compose(*stages)(model, MeshSpec.parse(mesh)).unwrap()  # type: ignore[arg-type]


def test_activation_parts_follow_the_layout() -> None:
    from moefn import plan_ac, plan_cp, plan_ep, plan_fsdp
    from moefn.analyse.activations import activation_memory

    def parts(plan: object, **kw: float) -> dict[str, int]:
        return dict(activation_memory(plan, rows=2, seq_len=512, **kw).parts)  # type: ignore[arg-type]

    ep = _tiny_plan("dp_shard=4,ep=2", plan_ep(), plan_fsdp())
    # received rows scale with the imbalance; the combine side (this rank's own T·k rows) does not
    one, two = (parts(ep, imbalance=f)["dispatch"] for f in (1.0, 2.0))
    assert 0 < one < two < 2 * one
    act = activation_memory(ep, rows=2, seq_len=512)  # type: ignore[arg-type]
    assert act.dispatch_worst > dict(act.parts)["dispatch"]
    cp = _tiny_plan("dp_shard=2,cp=2", plan_cp(seq_len=512), plan_fsdp())
    assert parts(cp)["cp_kv"] > 0 == parts(ep)["cp_kv"]
    totals = {mode: activation_memory(_tiny_plan("dp_shard=2", plan_ac(mode=mode), plan_fsdp()),  # type: ignore[arg-type]
                                      rows=8, seq_len=1024).total
              for mode in ("full", "selective")}
    none = activation_memory(_tiny_plan("dp_shard=2", plan_fsdp()), rows=8, seq_len=1024).total  # type: ignore[arg-type]
    assert none > totals["selective"] > totals["full"]


@pytest.mark.parametrize(("kwargs", "says"), [({"imbalance": 0.5}, "imbalance"),
                                              ({"rows": 0}, "rows"), ({"seq_len": 3}, "seq_len")])
def test_bad_micro_batches_are_typed_errors(kwargs: dict[str, float], says: str) -> None:
    from moefn import plan_cp, plan_fsdp
    from moefn.analyse.activations import activation_memory
    from moefn.plan.errors import PlanError

    plan = _tiny_plan("dp_shard=2,cp=2", plan_cp(), plan_fsdp())
    with pytest.raises(PlanError) as info:
        activation_memory(plan, **{"rows": 1, "seq_len": 8, **kwargs})  # type: ignore[arg-type]
    assert says in str(info.value)
