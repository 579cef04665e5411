"""transformers MoE models under moefn: recognition, EP/CP/AC/FSDP parity on real gloo ranks,
router-saving checkpointing, refusals, the command line, and moefn without transformers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

pytest.importorskip("transformers")

from moefn import MeshSpec, PlanError, compose, inspect_model, plan_cp, plan_ep, plan_fsdp
from moefn.adapters.reference import causal_lm_loss
from moefn.adapters.registry import adapter_for
from moefn.adapters.transformers.experts import local_experts, moefn_experts_forward
from moefn.cli import main
from moefn.plan.hf_roles import is_fused_experts
from moefn.plan.options import ACOptions, CPOptions, Dispatch, EPOptions, FSDPOptions
from moefn.plan.records import ActivationCheckpoint
from moefn.realize.apply import apply_checkpoint
from moefn.realize.routing_tape import is_recomputing
from moefn.train.loop import local_batch
from tests.hf_parity import (
    CONFIGS,
    HFCase,
    assert_hf_parity,
    build_hf,
    hf_batch,
    logits_of,
    run_hf_parity,
)
from tests.parity import worst_relative_error
from tests.ranks import RankPool

FSDP = FSDPOptions(precision="fp32")
CP = CPOptions(seq_len=16)
ROUTER_AC = ACOptions(mode="router")


def ep(dispatch: Dispatch) -> EPOptions:
    return EPOptions(dispatch=dispatch)


CP_EP_AC_FSDP = (CP, ep("all_to_all"), ROUTER_AC, FSDP)
CASES = [
    # id, case — 4 ranks: dp_shard=2 × cp=2 with ep=2 (ep_shard=2: experts get FSDP units too)
    ("qwen3_moe", HFCase(family="qwen3_moe", mesh="dp_shard=2,cp=2,ep=2", stages=CP_EP_AC_FSDP)),
    ("mixtral-all_gather", HFCase(family="mixtral", mesh="dp_shard=2,cp=2,ep=2",
                                  stages=(CP, ep("all_gather"), ROUTER_AC, FSDP))),
    ("olmoe", HFCase(family="olmoe", mesh="dp_shard=2,cp=2,ep=2", stages=CP_EP_AC_FSDP)),
    ("qwen2_moe-shared-expert", HFCase(family="qwen2_moe", mesh="dp_shard=2,cp=2,ep=2",
                                       stages=CP_EP_AC_FSDP)),
    ("deepseek_v3-mla-groups-fp32-gate", HFCase(family="deepseek_v3", mesh="dp_shard=2,cp=2,ep=2",
                                                stages=CP_EP_AC_FSDP)),
    # tied embeddings stay with the root unit (no backbone unit), ep=4 (one expert pair per rank)
    ("qwen3_moe-tied-ep4", HFCase(family="qwen3_moe", mesh="dp_shard=4,ep=4",
                                  stages=(ep("all_to_all"), ROUTER_AC, FSDP),
                                  extra=(("tie_word_embeddings", True),))),
]


@pytest.mark.parametrize("case", [c[1] for c in CASES], ids=[c[0] for c in CASES])
def test_parallel_hf_model_trains_like_one_process(ranks: Callable[[int], RankPool],
                                                   case: HFCase) -> None:
    results = ranks(4).run(run_hf_parity, case)
    for result in results:
        assert_hf_parity(result)
        assert result["experts_implementation"] == "moefn"
        with_cp = any(isinstance(s, CPOptions) for s in case.stages)
        assert result["attn_implementation"] == ("moefn" if with_cp
                                                 else result["reference_implementations"][1])
        assert result["reference_implementations"][0] != "moefn"  # the reference is untouched
        done, mesh = result["installed"], MeshSpec.parse(case.mesh)
        dispatch = next(s.dispatch for s in case.stages if isinstance(s, EPOptions))
        assert done["dispatchers"] == [{"all_to_all": "AllToAllDispatch",
                                        "all_gather": "AllGatherDispatch"}[dispatch]]
        assert done["plain_expert_params"] == 0 and done["experts_placements"]
        assert all("Shard(dim=0)" in p for p in done["experts_placements"])
        assert done["checkpointed"] == len(ROLES_OF[case.family][0])
        assert done["router_replay"] == ROLES_OF[case.family][1]
        assert done["cp_attention"] == (len(ROLES_OF[case.family][0]) if mesh.cp > 1 else 0)


WINDOW = (("sliding_window", 4),)  # under the 8 tokens a cp rank holds, and across cp ranks
WINDOWED = {  # family: tiny-config overrides; each has a sliding and a full-attention layer
    "gpt_oss": WINDOW,  # per-head sinks on both layers; EP: biased, transposed, interleaved experts
    "granitemoe_swa": (*WINDOW, ("layer_types", ["sliding_attention", "full_attention"])),  # sinks
    "mimo_v2_flash": WINDOW,  # sinks on the sliding layer only, more KV heads there
    "cohere2_moe": WINDOW, "exaone_moe": WINDOW, "kolibri1": WINDOW, "beam": WINDOW,
}


def test_sliding_window_and_sink_attention_trains_like_one_process_with_cp(
        ranks: Callable[[int], RankPool]) -> None:
    """cp=2 × ep=2 × router AC × FSDP, a family per pool call (see tests/ranks.py)."""
    for family, extra in WINDOWED.items():
        case = HFCase(family=family, mesh="dp_shard=2,cp=2,ep=2", stages=CP_EP_AC_FSDP, extra=extra)
        for result in ranks(4).run(run_hf_parity, case):
            assert result["attn_implementation"] == "moefn", case.family
            done = result["installed"]
            assert done["cp_attention"] == done["checkpointed"] == 2, (case.family, done)
            assert done["dispatchers"] == ["AllToAllDispatch"] and done["router_replay"], done
            try:
                assert_hf_parity(result)
            except AssertionError as error:
                raise AssertionError(f"{case.family}: {error}") from None


ROUTER_SHAPES = {  # family: its router, nested or with more rows than routed experts
    "llama4_text": "dense sigmoid scores; the expert's input is scaled, its output is not",
    "hunyuan_v1_moe": "gate.wg, an fp32 Linear; shared_mlp",
    "gemma4_text": "router.proj after a norm, per-expert scales; experts beside a dense MLP",
    "afmoe": "router.gate, sigmoid with a bias only for the choice",
    "inkling_text": "gate.weight with rows for the shared experts too",
    "zaya": "gate.router_mlp.out_proj, an MLP with a row for the skip expert; top-1",
}


def test_router_shapes_train_like_one_process(ranks: Callable[[int], RankPool]) -> None:
    """EP 2 × router AC × FSDP on 4 ranks, a family per pool call: each router is recognised
    (its top-k replayed in recompute) and training matches one process: losses relative to
    the loss and gradients relative to their largest entry. Gemma 4 trains at lr 0.1: at 0.5
    its third-step loss differs by 1.6e-5 of 4.1 (its post-experts RMSNorm amplifies fp32
    summation order once the weights have moved that far)."""
    for family in ROUTER_SHAPES:
        case = HFCase(family=family, mesh="dp_shard=4,ep=2", stages=(ep("all_to_all"), ROUTER_AC, FSDP),
                      lr=0.1 if family == "gemma4_text" else 0.5)
        spec = inspect_model(build_hf(family, device="meta"))
        for result in ranks(4).run(run_hf_parity, case):
            done = result["installed"]
            assert done["dispatchers"] == ["AllToAllDispatch"], (family, done)
            assert done["checkpointed"] == len(spec.paths_with("block")), (family, done)
            assert done["router_replay"] == len(spec.paths_with("router")) > 0, (family, done)
            relative = max(abs(a - b) / abs(b) for a, b in zip(result["losses"],
                                                                  result["reference"], strict=True))
            try:
                assert_hf_parity({**result, "max_loss_diff": relative})
            except AssertionError as error:
                raise AssertionError(f"{family}: {error}") from None


def test_llama4_chunked_and_temperature_tuned_attention_trains_like_one_process_with_cp(
        ranks: Callable[[int], RankPool]) -> None:
    """Llama 4 with cp=2 × ep=2 × router AC × FSDP: a RoPE layer attending in chunks of 8 and a
    NoPE layer whose queries transformers scales by position (temperature tuning, floor_scale 4
    in the tiny config), both at the tokens' indices in the whole sequence although its decoder
    layer passes no position_ids: losses and every gradient within 1e-5, none zero."""
    case = HFCase(family="llama4_text", mesh="dp_shard=2,cp=2,ep=2", stages=CP_EP_AC_FSDP)
    for result in ranks(4).run(run_hf_parity, case):
        done = result["installed"]
        assert done["cp_attention"] == done["checkpointed"] == 2, done
        assert done["temperature_tuned"] == 1, done  # the NoPE layer's, at global positions
        assert_hf_parity(result)


def _masked_attention_on_ranks(rank: int, world: int) -> dict[str, float]:
    """Each mask kind on 4 cp ranks (head-tail, 4 tokens each) against transformers' eager
    attention with its own mask functions over the whole sequence: output and input gradients."""
    import torch.distributed as dist
    from transformers.masking_utils import (
        chunked_causal_mask_function,
        eager_mask,
        sliding_window_causal_mask_function,
    )
    from transformers.models.mimo_v2_flash.modeling_mimo_v2_flash import eager_attention_forward

    from moefn.realize.context_parallel import attend_all_gathered, shard_sequence, unshard_sequence

    seq, generator = 16, torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, heads, seq, 8, generator=generator) for heads in (4, 2, 2))
    sinks, weight = torch.randn(4, generator=generator), torch.randn(2, seq, 4, 8, generator=generator)
    positions = torch.arange(seq).expand(2, seq)
    kinds = {"window": ({"window": 3}, sliding_window_causal_mask_function(3), False),
             "chunk": ({"chunk": 3}, chunked_causal_mask_function(3, torch.zeros(2, dtype=torch.long)),
                       False),
             "sinks+window": ({"window": 5}, sliding_window_causal_mask_function(5), True)}
    errors = {}
    for name, (options, mask_function, with_sinks) in kinds.items():
        leaves = [t.clone().requires_grad_() for t in (q, k, v, sinks)]
        mine = [shard_sequence(t, world, rank, dim=2) for t in leaves[:3]]
        out = attend_all_gathered(*mine, shard_sequence(positions, world, rank), True,
                                  dist.group.WORLD, 8 ** -0.5, **options,
                                  sinks=leaves[3].reshape(1, -1, 1, 1) if with_sinks else None)
        (out.transpose(1, 2) * shard_sequence(weight, world, rank)).sum().backward()
        grads = [t.grad for t in leaves if t.grad is not None]
        for grad in grads:
            dist.all_reduce(grad)
        outs = [torch.empty_like(out) for _ in range(world)]
        dist.all_gather(outs, out.detach())

        ref_leaves = [t.clone().requires_grad_() for t in (q, k, v, sinks)]
        module = nn.Module()
        module.num_key_value_groups, module.training = 2, False  # type: ignore[assignment]
        module.sinks = ref_leaves[3] if with_sinks else None  # type: ignore[assignment]
        mask = eager_mask(batch_size=2, q_length=seq, kv_length=seq, mask_function=mask_function,
                          dtype=torch.float32)
        ref, _ = eager_attention_forward(module, *ref_leaves[:3], mask, 8 ** -0.5)
        (ref * weight).sum().backward()
        ref_grads = [t.grad for t in ref_leaves if t.grad is not None]
        assert len(grads) == len(ref_grads) == 3 + with_sinks
        errors[name] = max(float((unshard_sequence(outs, dim=2).transpose(1, 2) - ref).abs().max()),
                           *(float((g - r).abs().max()) for g, r in zip(grads, ref_grads, strict=True)))
    return errors


def test_windowed_chunked_and_sink_attention_match_transformers_masks_across_cp_ranks(
        ranks: Callable[[int], RankPool]) -> None:
    for errors in ranks(4).run(_masked_attention_on_ranks):
        assert set(errors) == {"window", "chunk", "sinks+window"}
        assert max(errors.values()) < 1e-5, errors


ROLES_OF = {  # family: (decoder layers, MoE routers)
    "qwen3_moe": ((0, 1), 2), "mixtral": ((0, 1), 2), "olmoe": ((0, 1), 2),
    "qwen2_moe": ((0, 1), 2), "deepseek_v3": ((0, 1, 2), 2),
}


# ---- recognition -----------------------------------------------------------------------------

ROLES = {  # family: (blocks, moe blocks, shared experts, keep_fp32 routers)
    "qwen3_moe": (2, 2, 0, 0), "mixtral": (2, 2, 0, 0), "olmoe": (2, 2, 0, 0),
    "qwen2_moe": (2, 2, 2, 0), "deepseek_v3": (3, 2, 2, 2), "gpt_oss": (2, 2, 0, 0),
}


@pytest.mark.parametrize("family", list(CONFIGS))
def test_recogniser_tags_every_piece(family: str) -> None:
    spec = inspect_model(build_hf(family, device="meta"))
    blocks, moe, shared, fp32 = ROLES[family]
    assert spec.family == f"transformers:{family}"
    assert spec.paths_with("block") == tuple(f"model.layers.{i}" for i in range(blocks))
    assert spec.paths_with("core_attention") == tuple(f"model.layers.{i}.self_attn"
                                                      for i in range(blocks))
    assert len(spec.paths_with("moe")) == len(spec.paths_with("experts")) == moe
    assert len(spec.paths_with("router")) == moe
    assert len(spec.paths_with("shared_experts")) == shared
    assert len(spec.paths_with("keep_fp32")) == fp32
    assert spec.paths_with("embed") == ("model.embed_tokens",)
    assert spec.paths_with("lm_head") == ("lm_head",)
    assert spec.paths_with("backbone") == ("model",)
    experts = spec.module(spec.paths_with("experts")[0])
    assert experts.fact("num_experts") == 8


def test_tied_embeddings_keep_the_backbone_out_of_fsdp_units() -> None:
    model = build_hf("qwen3_moe", device="meta", tie_word_embeddings=True)
    spec = inspect_model(model)
    assert spec.paths_with("backbone") == () and spec.tied
    plan = compose(plan_fsdp())(model, MeshSpec(dp_shard=4)).unwrap()
    units = [s.path for s in plan.steps if type(s).__name__ == "FullyShard"]
    assert "model" not in units and "" in units and "model.embed_tokens" not in units


def test_cp_plans_windows_and_sinks_and_refuses_indexed_and_compressed_attention() -> None:
    mesh = MeshSpec(dp_shard=2, cp=2)
    for model in (build_hf("gpt_oss", device="meta"),
                  build_hf("mixtral", device="meta", sliding_window=8)):
        assert compose(plan_cp())(model, mesh).unwrap().stages == ("cp",)
    ring = str(compose(plan_cp(comm="p2p"))(build_hf("gpt_oss", device="meta"), mesh).failure())
    assert "model.layers.0.self_attn: ring (p2p) attention masks causally only (value: attention " \
           "sinks, sliding_window=128)" in ring and 'use plan_cp(comm="all_gather")' in ring
    assert "model.layers.1.self_attn: ring (p2p) attention masks causally only (value: attention " \
           "sinks)" in ring
    for family, kind in (("deepseek_v32", "indexed_attention"), ("glm_moe_dsa", "indexed_attention"),
                         ("deepseek_v4", "compressed"),
                         ("inkling_text", "Inkling's attention adds a relative position bias"),
                         ("inkling2_text", "Inkling 2's attention adds a relative position bias"),
                         ("zaya", "ZAYA's compressed convolutional attention mixes queries")):
        refused = str(compose(plan_cp())(build_hf(family, device="meta"), mesh).failure())
        grouped = refused.replace(" ×2", "")  # equal problems on both layers are listed once
        assert "self_attn: attention cannot be context-parallel (value: " in grouped, refused
        assert kind in refused and "leave plan_cp out for this model" in refused, refused


def test_moefn_attention_refuses_what_it_cannot_apply_at_run_time() -> None:
    from moefn.adapters.transformers.attention import install_context_parallel, moefn_attention_forward
    from moefn.launch import one_rank_group

    model = build_hf("gpt_oss", sliding_window=4)
    with one_rank_group() as group:
        for layer in model.model.layers:
            install_context_parallel(layer.self_attn, group, comm="p2p")
        with pytest.raises(ValueError, match=r"ring \(p2p\) attention masks causally only"):
            logits_of(model, hf_batch(64, 1, 8, 0))
    q = torch.zeros(1, 4, 8, 8)
    with pytest.raises(ValueError, match="does not apply sinks, position_bias"):
        moefn_attention_forward(nn.Linear(1, 1), q, q, q, None, position_ids=torch.arange(8)[None],
                                sinks=q[..., :1], position_bias=q[..., :8])


# ---- hybrid models: decoder layers whose mixer is not softmax attention ------------------------

HYBRIDS = ("qwen3_next", "nemotron_h", "jamba", "granitemoehybrid", "lfm2_moe", "qwen3_5_moe_text",
           "lara_mini", "qwen4_exp_text")
HYBRID_MESH = "dp_shard=4,ep=2"


def _family_trains_like_one_process(rank: int, world: int, family: str,
                                    precision: str) -> dict[str, Any]:
    """``family`` with EP 2 × router AC × FSDP in ``precision`` (fp32, or a bf16 policy), beside
    plain data parallelism on the same slices."""
    case = HFCase(family=family, mesh=HYBRID_MESH, steps=2,
                  stages=(ep("all_to_all"), ROUTER_AC, FSDPOptions(precision=precision)),
                  control=True)
    result = run_hf_parity(rank, world, case)
    return {k: result[k] for k in (
        "losses", "reference", "max_loss_diff", "grad_errors", "zero_grads", "unreached",
        "control_errors",
        "state_dict_keys", "reference_keys", "kept_in_forward", "kept_stored", "installed")}


def test_hybrid_models_train_like_one_process(ranks: Callable[[int], RankPool]) -> None:
    """Mamba, gated delta-net and short-conv layers beside attention and MoE layers: fp32 matches
    one process (≤ 1e-5); under bf16 the mixers' A_log/D/dt_bias (and NemotronH's fp32 router)
    are fp32 in forward and after the optimizer step, their gradients are summed over the ranks
    (within bf16 noise of one process), and the losses follow within bf16. Qwen4-exp's indexer
    selects tokens by top-k, so the loss reaches its parameters in neither model (`unreached`)."""
    for family in HYBRIDS:  # a case per pool call: see tests/ranks.py
        for exact, bf16 in zip(ranks(4).run(_family_trains_like_one_process, family, "fp32"),
                               ranks(4).run(_family_trains_like_one_process, family, "bf16"),
                               strict=True):
            assert_hf_parity(exact)
            assert exact["installed"]["checkpointed"] == len(build_hf(family, device="meta")
                                                             .model.layers)
            kept = bf16["kept_in_forward"]
            if family != "lfm2_moe":  # its short convolution holds no parameter directly
                assert any(n.endswith(("A_log", "D", "dt_bias")) for n in kept), (family, kept)
            assert set(kept.values()) | set(bf16["kept_stored"].values()) <= {"torch.float32"}, \
                (family, kept, bf16["kept_stored"])
            assert set(exact["kept_in_forward"].values()) <= {"torch.float32"}
            assert max((bf16["grad_errors"][n] for n in kept), default=0.0) <= 0.1, \
                (family, bf16["grad_errors"])
            assert bf16["max_loss_diff"] <= 2e-2 * abs(bf16["reference"][0]), (family, bf16)
            assert bf16["losses"][-1] < bf16["losses"][0] and not bf16["zero_grads"], family
            assert bf16["state_dict_keys"] == bf16["reference_keys"]


def test_hyper_connection_models_train_like_plain_data_parallelism(
        ranks: Callable[[int], RankPool]) -> None:
    """DeepSeek-V4 and HY-V4 (hyper-connections; hash, indexed and compressed attention) in fp32:
    where plain data parallelism on the same slices, without moefn, already differs from one
    process by more than 1e-5 (DeepSeek-V4's hash-routed gate, whose gradient is round-off near
    1e-11, and its head's hyper-connection scale), moefn stays within twice that; every other
    gradient within 1e-5."""
    for family in ("deepseek_v4", "hy_v4"):
        for result in ranks(4).run(_family_trains_like_one_process, family, "fp32"):
            try:
                assert_hf_parity(result)
            except AssertionError as error:
                raise AssertionError(f"{family}: {error}") from None
            assert result["control_errors"].keys() == result["grad_errors"].keys() - set(
                result["unreached"]), family


def test_cp_refuses_hybrid_mixers_by_name() -> None:
    mesh = MeshSpec(dp_shard=2, cp=2)
    text = str(compose(plan_cp())(build_hf("qwen3_next", device="meta"), mesh).failure())
    assert "model.layers.0.linear_attn: linear attention cannot be context-parallel yet (value: " \
           "Qwen3NextGatedDeltaNet)" in text, text
    assert "model.layers.1" not in text  # its softmax attention alone would take CP
    assert "no attention module" not in str(compose(plan_cp())(build_hf("jamba", device="meta"),
                                                               mesh).failure())


@pytest.mark.parametrize("master", [["--master-dtype", "fp32"], []],
                         ids=["fp32-master", "bf16-model"])
@pytest.mark.parametrize(("family", "kept"), [
    ("qwen3_next", "model.layers.0.linear_attn [fsdp] keep dt_bias, A_log in float32"),
    ("nemotron_h", "model.layers.0.mixer [fsdp] keep dt_bias, A_log, D in float32"),
])
def test_hybrid_plan_names_the_parameters_kept_in_fp32(capsys: pytest.CaptureFixture[str],
                                                       tmp_path: Path, family: str,
                                                       kept: str, master: list[str]) -> None:
    """fp32 master weights with bf16 compute, and a bf16 model whose mixers keep their fp32
    parameters fp32 (`keep_fp32`): the same parameters stay fp32 the same way."""
    from moefn.adapters.transformers.catalogue import tiny_config

    path = tmp_path / "config.json"
    # NemotronH's default time_step_limit (0, inf) does not survive transformers' own JSON
    extra = {"time_step_limit": (0.0, 1e9)} if family == "nemotron_h" else {}
    path.write_text(tiny_config(family, **extra).to_json_string())
    assert main(["plan", "--hf-config", str(path), "--mesh", HYBRID_MESH, *master]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert f"{kept} outside FSDP (ignored_params); gradient all-reduce (sum, float32) over " \
           "dp_shard_cp(4)" in text, text
    if family == "nemotron_h":  # transformers keeps its router in fp32: a unit of its own
        assert "model.layers.1.mixer.gate [fsdp] fully_shard mesh=dp_shard_cp(4) shard_dim=0 " \
               "reshard=True param=float32 reduce=float32" in text, text


def test_hf_model_without_fused_experts_is_unrecognised() -> None:
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                         intermediate_size=64)
    with torch.device("meta"):
        dense = AutoModelForCausalLM.from_config(config)
    with pytest.raises(PlanError, match=r"unrecognised model architecture.*recognisers tried: "
                                        r"moefn, transformers"):
        inspect_model(dense)


def test_hf_moe_model_with_missing_pieces_lists_found_and_expected() -> None:
    model = build_hf("qwen3_moe", device="meta")
    model.model.layers[1].mlp.gate = nn.Identity()
    result = compose(plan_ep())(model, MeshSpec(dp_shard=2, ep=2))
    text = str(result.failure())
    assert "model.layers.1.mlp: transformers MoE model: no router (value: found children " \
           "['experts', 'gate'])" in text
    assert "expected a sibling of the experts called one of ('gate', 'router') holding a " \
           "weight of at least 8 rows (a Linear or an MLP)" in text
    backbone = build_hf("qwen3_moe", device="meta").model  # no lm_head: not a causal LM
    with pytest.raises(PlanError, match="no lm_head.*expected a causal LM"):
        inspect_model(backbone)


# ---- EP: local experts in the HF layout --------------------------------------------------------

@pytest.mark.parametrize("family", list(CONFIGS))
@pytest.mark.parametrize("impl", ["loop", "grouped_mm"])
def test_moefn_experts_match_transformers_experts(family: str, impl: str) -> None:
    model = build_hf(family)
    experts = next(m for m in model.modules() if is_fused_experts(m))
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(12, 32, generator=generator)
    index = torch.stack([torch.randperm(8, generator=generator)[:2] for _ in range(12)])
    index[:, 0] = torch.where(index[:, 0] == 3, 4, index[:, 0])  # expert 3 gets at most a few
    weights = torch.rand(12, 2, generator=generator)
    with torch.no_grad():
        want = experts(x, index, weights)  # transformers' own (grouped_mm) implementation
    setattr(experts, "moefn_impl", impl)
    with torch.no_grad():
        got = moefn_experts_forward(experts, x, index, weights)
    assert float((got - want).abs().max()) <= 1e-6 * float(want.detach().abs().max())
    empty = local_experts(experts, x[:0], torch.zeros(8, dtype=torch.int64), impl)
    assert empty.shape == (0, 32)


# ---- AC: router-saving replays the routers' own top-k ------------------------------------------

def _checkpointed(family: str, mode: str) -> nn.Module:
    model = build_hf(family)
    adapter = adapter_for(model)
    assert adapter is not None and adapter.name == "transformers"
    if mode != "off":
        for path in inspect_model(model).paths_with("block"):
            apply_checkpoint(ActivationCheckpoint(stage="ac", path=path, mode=mode),  # type: ignore[arg-type]
                             model.get_submodule(path), adapter)
    return model


def _grads(model: nn.Module) -> dict[str, torch.Tensor]:
    batch = hf_batch(64, 4, 16, 0)
    causal_lm_loss((logits_of(model, batch),), batch.labels, batch.num_valid).backward()
    return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def _rerouted_grads(mode: str) -> dict[str, torch.Tensor]:
    """DeepSeek-V3 whose routers see another correction bias on recompute (every token would
    pick other experts), swapped in without running an op."""
    model = _checkpointed("deepseek_v3", mode)
    perturbed = torch.arange(8, dtype=torch.float32) * 100

    def perturb(router: nn.Module, args: Any) -> None:
        if is_recomputing():
            router.e_score_correction_bias = perturbed

    for name, module in model.named_modules():
        if name.endswith("mlp.gate"):
            module.register_forward_pre_hook(perturb)
    return _grads(model)


def test_router_saving_survives_rerouting_on_recompute() -> None:
    reference = _rerouted_grads("off")
    assert worst_relative_error(_rerouted_grads("router"), reference) == 0.0
    assert worst_relative_error(_rerouted_grads("selective"), reference) == 0.0  # top-k is saved
    assert worst_relative_error(_rerouted_grads("full"), reference) > 0.1  # the test can fail


class _CountRecomputedTopK(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.topk = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if is_recomputing() and func.overloadpacket.__name__ == "topk":
            self.topk += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_router_mode_recomputes_no_top_k_and_keeps_gradients(family: str) -> None:
    reference = _grads(_checkpointed(family, "off"))
    counts = {}
    for mode in ("full", "router"):
        model = _checkpointed(family, mode)
        batch = hf_batch(64, 4, 16, 0)
        loss = causal_lm_loss((logits_of(model, batch),), batch.labels, batch.num_valid)
        with _CountRecomputedTopK() as counter:
            loss.backward()
        counts[mode] = counter.topk
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        assert worst_relative_error(grads, reference) <= 1e-6
    assert counts == {"full": 2, "router": 0}


# ---- plans, presets and the command line ------------------------------------------------------

def test_full_size_presets_plan_on_meta(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--model", "hf-deepseek-v3", "--mesh", "dp_shard=1024,ep=64",
                 "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    experts = [s for s in doc["steps"] if s["record"] == "DistributeParams"]
    assert len(experts) == 58 and experts[0]["params"] == ["gate_up_proj", "down_proj"]
    assert doc["local_shapes"]["model.layers.3.mlp.experts.gate_up_proj"] == [
        {"shape": [4, 256, 7168], "ranks": 1024}]
    fp32 = [s for s in doc["steps"] if s["record"] == "FullyShard" and s["path"].endswith(".gate")]
    assert len(fp32) == 58 and fp32[0]["param_dtype"] == "float32"  # the fp32 router unit
    assert main(["plan", "--model", "hf-qwen3-30b-a3b", "--mesh", "dp_shard=16,ep=8"]) == 0
    assert "128 experts, 16 per rank" in capsys.readouterr().out


def test_plan_from_a_transformers_config_json(tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "config.json"
    path.write_text(CONFIGS["mixtral"]().to_json_string())
    assert main(["plan", "--hf-config", str(path), "--mesh", "dp_shard=4,ep=4", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert {s["path"] for s in doc["steps"] if s["record"] == "InstallDispatch"} == {
        "model.layers.0.mlp.experts", "model.layers.1.mlp.experts"}
    path.write_text(json.dumps({"hidden_size": 4}))
    assert main(["plan", "--hf-config", str(path), "--mesh", "dp_shard=4"]) == 1
    assert "cannot build the transformers config" in capsys.readouterr().out


def test_moefn_works_without_transformers() -> None:
    script = """
import importlib.abc, sys
class Blocked(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] == "transformers":
            raise ImportError("transformers is blocked")
sys.meta_path.insert(0, Blocked())
import torch
import moefn, moefn.cli, moefn.realize, moefn.hf, moefn.adapters.transformers
import moefn.adapters.transformers.presets, moefn.plan.hf_roles
from moefn import MeshSpec, compose, plan_ep
from moefn.adapters.reference import MoETransformer, get_preset
with torch.device("meta"):
    model = MoETransformer(get_preset("tiny"))
assert compose(plan_ep())(model, MeshSpec(dp_shard=2, ep=2)).unwrap().stages == ("ep",)
assert "transformers" not in sys.modules
print(moefn.cli.main(["plan", "--model", "hf-mixtral-8x7b", "--mesh", "dp_shard=8,ep=8"]))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert "cannot build the transformers config" in out.stdout and out.stdout.strip()[-1] == "1"


# ---- pretrained weights and checkpoints -------------------------------------------------------

PRETRAINED_MESH = "dp_shard=4,ep=2"


def _from_pretrained_on_ranks(rank: int, world: int, family: str, root: str) -> dict[str, Any]:
    """save_pretrained → (a) from_pretrained + realize, (b) meta realize + load_pretrained; plus a
    DCP round trip of (b) into a plain HF model."""
    import torch.distributed as dist
    from transformers import AutoConfig, AutoModelForCausalLM

    from moefn.adapters.transformers.pretrained import load_pretrained
    from moefn.plan.stages import plan_ac
    from moefn.realize import build_device_meshes, realize
    from moefn.train.dcp import full_state_dict, load_checkpoint, save_checkpoint

    path = os.path.join(root, family)
    if rank == 0:
        build_hf(family).save_pretrained(path)
    dist.barrier()
    mesh = MeshSpec.parse(PRETRAINED_MESH)
    stages = (plan_ep(), plan_ac(mode="router"), plan_fsdp(precision="fp32"))

    def realized(model: nn.Module) -> nn.Module:
        realize(compose(*stages)(model, mesh).unwrap(), model, build_device_meshes(mesh, "cpu"))
        return model.eval()

    eager = realized(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32))
    config = AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        lazy = realized(AutoModelForCausalLM.from_config(config, dtype=torch.float32))
    experts = lazy.get_submodule("model.layers.1.mlp.experts").get_parameter("gate_up_proj")
    load_pretrained(lazy, path, "cpu")
    batch = hf_batch(int(config.vocab_size), 4, 16, 0)
    mine = local_batch(batch, mesh, rank)
    with torch.no_grad():
        logits = [logits_of(m, mine) for m in (eager, lazy)]
    full_eager, full_lazy = full_state_dict(eager), full_state_dict(lazy)
    save_checkpoint(os.path.join(path, "dcp"), lazy, None)
    dist.barrier()
    plain = build_hf(family, seed=1)
    load_checkpoint(os.path.join(path, "dcp"), plain, None)
    plain_state = {k: v for k, v in plain.state_dict().items()}
    return {
        "keys": sorted(full_lazy) == sorted(full_eager),
        "differ": [k for k in full_eager if not torch.equal(full_eager[k], full_lazy[k])],
        "logits_equal": torch.equal(logits[0], logits[1]),
        "experts_local_shape": tuple(experts.to_local().shape),
        "experts_placements": str(experts.placements),
        "dcp_keys": sorted(plain_state) == sorted(full_eager),
        "dcp_differ": [k for k in full_eager if not torch.equal(full_eager[k], plain_state[k])],
    }


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "gpt_oss", "deepseek_v3"])
def test_meta_realized_model_loads_pretrained_shards_like_from_pretrained(
        ranks: Callable[[int], RankPool], tmp_path: Path, family: str) -> None:
    for result in ranks(4).run(_from_pretrained_on_ranks, family, str(tmp_path)):
        assert result["keys"] and result["differ"] == [], result
        assert result["logits_equal"], result  # rotary buffers rebuilt, every shard in place
        assert result["experts_local_shape"][0] in (2, 4), result  # sharded, never the full 8
        assert result["dcp_keys"] and result["dcp_differ"] == [], result  # HF keys, bit-exact


def test_load_pretrained_names_missing_keys(tmp_path: Path) -> None:
    from moefn.adapters.transformers.pretrained import load_pretrained

    model = build_hf("qwen3_moe")
    model.save_pretrained(tmp_path)
    with torch.device("meta"):
        other = build_hf("olmoe", device="meta")
    with pytest.raises(PlanError, match="shape .* in the checkpoint"):
        load_pretrained(other, tmp_path, "cpu")
    assert all(p.is_meta for p in other.parameters())  # untouched


def test_readme_transformers_quickstart_runs_verbatim(capsys: pytest.CaptureFixture[str]) -> None:
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    section = readme.split("## Quickstart: an unmodified transformers model", 1)[1]
    block = section.split("```python\n", 1)[1].split("```", 1)[0]
    exec(compile(block, "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert "model.layers.*.mlp.experts" in out and "Shard(0)@ep(8)" in out, out[:2000]


def test_train_step_feeds_a_transformers_model_its_positions() -> None:
    """``model(input_ids, position_ids)`` would hand a transformers causal LM the positions as
    its ``attention_mask`` (logits off by 0.22 on this model); train_step calls by keyword."""
    import copy

    from moefn.adapters.transformers.catalogue import build_tiny
    from moefn.train import train_step

    torch.manual_seed(0)
    model = build_tiny("qwen3_moe", device="cpu").float()
    twin = copy.deepcopy(model)
    batch = hf_batch(model.config.vocab_size, 2, 16, seed=0)
    num_valid = int((batch.labels != -100).sum())
    loss = train_step(model, torch.optim.SGD(model.parameters(), lr=0.1), batch, num_valid,
                      distributed=False)
    expected = causal_lm_loss((logits_of(twin, batch),), batch.labels, num_valid)
    assert loss == pytest.approx(float(expected), rel=1e-6, abs=0)
