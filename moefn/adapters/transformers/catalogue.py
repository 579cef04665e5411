"""The model list ``docs/models.md``: every transformers MoE causal-LM family, built tiny on the
meta device and planned (``python -m moefn.adapters.transformers.catalogue`` writes it, ``--check`` compares).

Families are found at run time: a ``model_type`` of ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`` whose
default config names experts: a key matching ``expert|moe`` (any case), also inside nested
sub-config dicts without a ``model_type`` of their own (DBRX's ``ffn_config``; a sub-model such
as ``gemma4``'s ``text_config`` is its own family, ``gemma4_text``, or none). A config whose
defaults do not build is scanned by its field names instead.

Each family is built tiny by one rule (`tiny_overrides`; latent attention keeps its default
equalities of K/V heads to heads and head_dim to the rotary width), then the exceptions of
`OVERRIDES`, by name with the reason; planned with EP + router AC + FSDP on
``dp_shard=4,ep=2`` and with CP on ``dp_shard=2,cp=2``.

>>> tiny_overrides({"hidden_size": 4096, "num_local_experts": 128, "num_experts_per_tok": 8,
...                 "num_hidden_layers": 48, "head_dim": 128, "q_lora_rank": None})
{'hidden_size': 32, 'num_local_experts': 8, 'num_experts_per_tok': 2, 'num_hidden_layers': 2, 'head_dim': 8}
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from attrs import frozen
from returns.pipeline import is_successful
from torch import nn

from moefn.plan.compose import compose
from moefn.plan.errors import PlanError
from moefn.plan.mesh import MeshSpec
from moefn.plan.stages import plan_ac, plan_cp, plan_ep, plan_fsdp

DOC = Path(__file__).parents[3] / "docs" / "models.md"
COMMAND = "python -m moefn.adapters.transformers.catalogue"
EP_MESH = "dp_shard=4,ep=2"
CP_MESH = "dp_shard=2,cp=2"
SEQ_LEN = 16
MOE_KEY = re.compile(r"expert|moe", re.IGNORECASE)

# the rule: a key (in the config or a nested sub-config dict) → its tiny value
TINY: dict[str, int] = {
    "vocab_size": 64, "hidden_size": 32, "d_model": 32, "num_hidden_layers": 2, "n_layers": 2,
    "num_attention_heads": 4, "n_heads": 4, "num_key_value_heads": 2, "kv_n_heads": 2,
    "head_dim": 8, "intermediate_size": 64, "ffn_hidden_size": 16, "moe_intermediate_size": 16,
    "shared_expert_intermediate_size": 32, "expert_ffn_hidden_size": 16,
    "moe_shared_expert_intermediate_size": 32, "shared_experts_intermediate_size": 32,
    "q_lora_rank": 16, "kv_lora_rank": 16, "qk_rope_head_dim": 4, "qk_nope_head_dim": 4,
    "v_head_dim": 8, "sliding_window": 8, "attention_chunk_size": 8, "num_layers": 2,
    # Gemma 4's per-layer input embedding (262144 × 256 by default: 134 M of a tiny model)
    "vocab_size_per_layer_input": 64, "hidden_size_per_layer_input": 8,
    # linear attention and Mamba mixers (hybrid models)
    "linear_num_key_heads": 2, "linear_num_value_heads": 4, "linear_key_head_dim": 8,
    "linear_value_head_dim": 8, "mamba_num_heads": 4, "mamba_head_dim": 16, "n_groups": 2,
    "ssm_state_size": 16, "mamba_d_state": 16, "mamba_dt_rank": 8,
}
EXPERTS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
TOP_K = ("num_experts_per_tok", "num_experts_per_token", "moe_topk", "moe_k", "moe_top_k",
         "top_k_experts")
AT_MOST_ONE = ("n_shared_experts", "num_shared_experts", "moe_num_shared_experts",
               "first_k_dense_replace", "moe_layer_start_index", "n_group", "topk_group",
               "num_expert_group", "num_dense_layers")
SET_WHEN_NONE = ("head_dim", "moe_intermediate_size", *EXPERTS, *TOP_K)  # None there breaks a build
TOKENS = ("pad_token_id", "bos_token_id", "eos_token_id")

# exceptions to the rule, by family: (config fields, reason)
OVERRIDES: dict[str, tuple[dict[str, Any], str]] = {
    "gemma4_text": ({"enable_moe_block": True}, "its MoE block is off by default"),
    "doge": ({"is_moe": True}, "its MoE block is off by default"),
    "flint": ({"mlp_only_layers": [0]}, "its first two layers are dense by default"),
    "dbrx": ({"attn_config": {"kv_n_heads": 2, "rope_theta": 10000.0}},
             "the default attention config lacks rope_theta, which the model reads"),
    "dots1": ({"n_shared_experts": 1}, "n_shared_experts defaults to None, which the model "
              "multiplies"),
    "granitemoehybrid": ({"mamba_n_heads": 4, "mamba_d_head": 16},
                         "mamba heads must divide mamba_expand × hidden_size"),
    "lfm2_moe": ({"layer_types": ["conv", "full_attention"]},
                 "layer_types defaults to None, which the model indexes"),
    "qwen4_exp_text": ({"indexer_n_heads": 2, "indexer_kv_heads": 1, "indexer_head_dim": 8,
                        "indexer_budget": 8, "indexer_compress_ratio": 2},
                       "the indexer sizes default to None, which the model divides"),
    "zaya": ({"num_experts_per_tok": 1}, "it supports top-1 routing only"),
    "llama4_text": ({"no_rope_layers": [1, 0], "floor_scale": 4},
                    "its query temperature tuning acts on NoPE layers only, from floor_scale "
                    "(8192) tokens on: one NoPE layer and floor_scale 4 make it act within 16"),
}


def _keys(data: Mapping[str, Any]) -> Iterator[str]:
    for key, value in data.items():
        yield str(key)
        if isinstance(value, Mapping) and not value.get("model_type"):
            yield from _keys(value)


def _config_class(model_type: str) -> Any:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    return CONFIG_MAPPING[model_type]


def moe_families() -> tuple[str, ...]:
    """The transformers MoE causal-LM families (``model_type``), sorted."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    families = frozenset(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    found = []
    for model_type in families:
        cls = _config_class(model_type)
        try:
            keys = list(_keys(cls().to_dict()))
        except Exception:  # defaults that do not validate: the declared fields
            keys = list(getattr(cls, "__dataclass_fields__", ()))
        if any(MOE_KEY.search(key) for key in keys):
            found.append(model_type)
    return tuple(sorted(found))


def _per_layer(values: list[Any], n: int) -> list[Any]:
    """A per-layer list for ``n`` layers: its distinct values in order, cycled."""
    kinds = list(dict.fromkeys(values))
    return [kinds[i % len(kinds)] for i in range(max(n, 1))]


def tiny_overrides(defaults: Mapping[str, Any]) -> dict[str, Any]:
    """The rule: tiny values for the size fields present in ``defaults`` (None stays None)."""
    out: dict[str, Any] = {}
    layers = next((defaults[k] for k in ("num_hidden_layers", "n_layers") if k in defaults), None)
    for key, value in defaults.items():
        if value is None and key in SET_WHEN_NONE:
            value = 0
        if isinstance(value, bool) or (value is None and key not in TOKENS):
            continue
        if key in TINY and isinstance(value, int):
            out[key] = TINY[key]
        elif key in EXPERTS and isinstance(value, int):
            out[key] = 8
        elif key in TOP_K and isinstance(value, int):
            out[key] = 2
        elif key in AT_MOST_ONE and isinstance(value, int):
            out[key] = min(value, 1)
        elif key in TOKENS:
            out[key] = None
        elif isinstance(value, list) and layers and len(value) == layers and value and all(
                isinstance(v, str) for v in value):
            out[key] = _per_layer(value, TINY["num_hidden_layers"])
        elif key == "per_layer_config" and isinstance(value, Mapping):
            out[key] = _tiny_per_layer(defaults, value)
        elif isinstance(value, Mapping) and "model_type" in value:
            nested = tiny_overrides(value)
            if nested:
                out[key] = {**value, **nested}
    if defaults.get("kv_lora_rank") is not None:
        out.update(_mla(defaults, out))
    return out


def _tiny_per_layer(defaults: Mapping[str, Any], per_layer: Mapping[str, Any]) -> dict[int, Any]:
    """A heterogeneous config's per-layer values (DOTS3: ``{"02": {...}}``) for the tiny layers:
    each takes the tiny values of the first default layer of its ``layer_types`` kind."""
    by_index = {int(k): v for k, v in per_layer.items()}
    kinds = list(defaults.get("layer_types") or ())
    tiny = {i: by_index.get(kinds.index(kind))
            for i, kind in enumerate(_per_layer(kinds, TINY["num_hidden_layers"]) if kinds else ())}
    return {i: tiny_overrides(values) for i, values in tiny.items() if values}


def _mla(defaults: Mapping[str, Any], out: Mapping[str, Any]) -> dict[str, Any]:
    """Multi-head latent attention expands K/V to every head and ropes ``qk_rope_head_dim``
    channels, with ``head_dim`` the rotary width: keep those default equalities when tiny."""
    tied = {"num_key_value_heads": "num_attention_heads", "head_dim": "qk_rope_head_dim"}
    return {key: out[other] for key, other in tied.items()
            if key in out and other in out and defaults.get(key) == defaults.get(other)}


def tiny_config(model_type: str, **extra: Any) -> Any:
    """The tiny config of ``model_type``: the rule, then `OVERRIDES`, then ``extra``."""
    cls = _config_class(model_type)
    fields = {**tiny_overrides(cls().to_dict()), **OVERRIDES.get(model_type, ({}, ""))[0], **extra}
    return cls(**fields)


def build_tiny(model_type: str, device: str = "meta", **extra: Any) -> nn.Module:
    """The tiny fp32 causal LM of ``model_type`` on ``device``."""
    from transformers import AutoModelForCausalLM

    auto: Any = AutoModelForCausalLM  # untyped in transformers
    with torch.device(device):
        model: nn.Module = auto.from_config(tiny_config(model_type, **extra), dtype=torch.float32)
    return model


@frozen(kw_only=True)
class Row:
    """One family's planning columns (``yes`` or the first problem with its fix)."""

    family: str
    ep_ac_fsdp: str
    cp: str

    @property
    def plans(self) -> bool:
        return self.ep_ac_fsdp == "yes"


def cell(text: str) -> str:
    """``text`` as one table cell.

    >>> cell("a | b\\n c")
    'a \\\\| b c'
    """
    return " ".join(text.replace("|", "\\|").split())


def _first_problem(error: object) -> str:
    if isinstance(error, PlanError) and error.problems:
        p = error.problems[0]
        return cell(f"no: {p.message} ({p.value}) — fix: {p.fix}")
    return cell(f"no: {error}")


def plan_row(model_type: str) -> Row:
    """Build ``model_type`` tiny on meta and plan it twice (pure: no process group)."""
    try:
        model = build_tiny(model_type)
    except Exception as error:  # any failure of transformers to build is the finding
        text = cell(f"tiny config does not build: {type(error).__name__}: {error}")[:300]
        return Row(family=model_type, ep_ac_fsdp=text, cp=text)
    plans = []
    for stages, mesh in (((plan_ep(), plan_ac(mode="router"), plan_fsdp()), EP_MESH),
                         ((plan_cp(seq_len=SEQ_LEN),), CP_MESH)):
        try:
            result = compose(*stages)(model, MeshSpec.parse(mesh))
            plans.append("yes" if is_successful(result) else _first_problem(result.failure()))
        except PlanError as error:
            plans.append(_first_problem(error))
        except Exception as error:  # a crash of the recogniser or a stage: a bug to report
            plans.append(cell(f"no: planning crashed: {type(error).__name__}: {error}")[:300])
    return Row(family=model_type, ep_ac_fsdp=plans[0], cp=plans[1])


SUITE = "tests/test_hf.py::test_parallel_hf_model_trains_like_one_process"
WINDOWED_SUITE = "tests/test_hf.py::test_sliding_window_and_sink_attention_trains_like_one_process_with_cp"
HYBRID_SUITE = "tests/test_hf.py::test_hybrid_models_train_like_one_process"
CONTROL_SUITE = "tests/test_hf.py::test_hyper_connection_models_train_like_plain_data_parallelism"
ROUTER_SUITE = "tests/test_hf.py::test_router_shapes_train_like_one_process"
LLAMA4_SUITE = ("tests/test_hf.py::test_llama4_chunked_and_temperature_tuned_attention_trains_like_"
                "one_process_with_cp")
SUITE_DATE = WINDOWED_DATE = HYBRID_DATE = CONTROL_DATE = ROUTER_DATE = "2026-11-30"
NUMERICS: dict[str, str] = {  # families the default suite's parity tests train on 4 gloo ranks
    **{family: f"matches one process: `{SUITE}[{case}]` ({SUITE_DATE})"
       for family, case in (("qwen3_moe", "qwen3_moe"), ("mixtral", "mixtral-all_gather"),
                            ("olmoe", "olmoe"), ("qwen2_moe", "qwen2_moe-shared-expert"),
                            ("deepseek_v3", "deepseek_v3-mla-groups-fp32-gate"))},
    **{family: f"matches one process with CP, sliding window 4: `{WINDOWED_SUITE}` ({WINDOWED_DATE})"
       for family in ("gpt_oss", "granitemoe_swa", "mimo_v2_flash", "cohere2_moe", "exaone_moe",
                      "kolibri1", "beam")},
    # hybrids (Mamba, gated delta-net, short conv): fp32 and bf16 with fp32 A_log/D/dt_bias
    **{family: f"matches one process: `{HYBRID_SUITE}` (fp32 ≤ 1e-5; bf16 policy, fp32 kept) "
               f"({HYBRID_DATE})"
       for family in ("qwen3_next", "nemotron_h", "jamba", "granitemoehybrid", "lfm2_moe",
                      "qwen3_5_moe_text", "lara_mini", "qwen4_exp_text")},
    # where plain data parallelism itself differs from one process (hyper-connections, hash gate)
    **{family: f"matches one process within plain data parallelism's own error: `{CONTROL_SUITE}` "
               f"(≤ 2× the control where it exceeds 1e-5, else ≤ 1e-5) ({CONTROL_DATE})"
       for family in ("deepseek_v4", "hy_v4")},
    # routers nested, with extra rows or an MLP; Llama 4's input-scaled experts
    **{family: f"matches one process: `{ROUTER_SUITE}` (losses and gradients relative ≤ 1e-5) "
               f"({ROUTER_DATE})"
       for family in ("hunyuan_v1_moe", "gemma4_text", "afmoe", "inkling_text")},
    "llama4_text": f"matches one process, and with CP (chunks, temperature tuning): "
                   f"`{ROUTER_SUITE}`, `{LLAMA4_SUITE}` ({ROUTER_DATE})",
}
NOT_CHECKED = "not checked"
HEADER = "| family | EP + router AC + FSDP ({ep}) | CP ({cp}) | numerics |"
_SPLIT = re.compile(r"(?<!\\)\|")


def _version() -> str:
    import transformers

    return str(transformers.__version__)


def _reason(cell: str) -> str:
    """A refusal's kind: the text before its value, e.g. ``no: transformers MoE model: no router``."""
    return ":".join(cell.split(" (", 1)[0].split(":")[:3]) if cell.startswith("no:") else \
        cell.split(":", 1)[0]


def render(rows: list[Row], numerics: Mapping[str, str]) -> str:
    """docs/models.md for ``rows`` (numerics: family → how its numerics were checked)."""
    ep, cp = sum(r.plans for r in rows), sum(r.cp == "yes" for r in rows)
    checks = [numerics.get(r.family, NOT_CHECKED) for r in rows]
    matched = sum(c.startswith("matches") for c in checks)
    cp_matched = sum(c.startswith("matches") and "with CP" in c for c in checks)
    refusals: dict[str, list[str]] = {}
    for row in rows:
        if not row.plans:
            refusals.setdefault(_reason(row.ep_ac_fsdp), []).append(row.family)
    lines = [
        "# transformers MoE causal-LM families under moefn",
        "",
        f"Generated by `{COMMAND}` for transformers {_version()}; do not edit by hand "
        f"(`tests/test_models_doc.py` fails when the planning columns are stale). Numerics: "
        f"`nox -s models` (4 gloo ranks, {EP_MESH}, router AC, FSDP vs one process; a family "
        f"that plans CP also with dp_shard=2,cp=2,ep=2).",
        "",
        "The error `unrecognised model architecture` points here: a family refused below says "
        "why, and what to do about it.",
        "",
        f"**{len(rows)} families: {ep} plan with EP + router AC + FSDP, {cp} with CP, "
        f"{matched} match one process, {cp_matched} of them with CP too.**",
        "",
        "How the list is made: " + " ".join(__doc__.split("\n\n")[1].split()),
        "",
        "Exceptions to the tiny-config rule: " + "; ".join(
            f"`{name}` {fields} ({reason})" for name, (fields, reason) in OVERRIDES.items()) + ".",
        "",
        "Refused with EP + router AC + FSDP, by reason:",
        "",
        *(f"- {reason}: {', '.join(f'`{f}`' for f in families)}"
          for reason, families in sorted(refusals.items(), key=lambda kv: -len(kv[1]))),
        "",
        HEADER.format(ep=EP_MESH, cp=CP_MESH),
        "|---|---|---|---|",
        *(f"| `{r.family}` | {r.ep_ac_fsdp} | {r.cp} | {numerics.get(r.family, NOT_CHECKED)} |"
          for r in rows),
    ]
    return "\n".join(lines) + "\n"


def parse(text: str) -> dict[str, tuple[str, str, str]]:
    """The table of a rendered doc: family → (EP + AC + FSDP, CP, numerics) cells."""
    out = {}
    for line in text.splitlines():
        cells = [c.strip() for c in _SPLIT.split(line)[1:-1]]
        if len(cells) == 4 and cells[0].startswith("`"):
            out[cells[0].strip("`")] = (cells[1], cells[2], cells[3])
    return out


def stale(text: str, rows: list[Row]) -> list[str]:
    """How ``text`` differs from ``rows`` in the planning columns, naming each family."""
    table = parse(text)
    problems = [f"{f}: in docs/models.md, not among the installed transformers' MoE families"
                for f in table if f not in {r.family for r in rows}]
    for row in rows:
        if row.family not in table:
            problems.append(f"{row.family}: missing from docs/models.md")
        elif table[row.family][:2] != (row.ep_ac_fsdp, row.cp):
            problems.append(f"{row.family}: docs/models.md says {table[row.family][:2]}, "
                            f"planning says {(row.ep_ac_fsdp, row.cp)}")
    if f"for transformers {_version()};" not in text:
        problems.append(f"docs/models.md is not for the installed transformers {_version()}")
    return problems


def numerics_of(text: str) -> dict[str, str]:
    """The numerics column of a doc, over the suite's defaults (kept when regenerating)."""
    return {**NUMERICS, **{f: cells[2] for f, cells in parse(text).items() if cells[2] != NOT_CHECKED}}


def write(numerics: Mapping[str, str] | None = None, path: Path = DOC) -> list[Row]:
    """Plan every family and write ``path`` (numerics given here win over the file's)."""
    rows = [plan_row(f) for f in moe_families()]
    old = path.read_text() if path.exists() else ""
    path.write_text(render(rows, {**numerics_of(old), **(numerics or {})}))
    return rows


def main(argv: list[str] | None = None) -> int:
    """Write docs/models.md, or with ``--check`` list its stale rows (exit 1)."""
    parser = argparse.ArgumentParser(prog=COMMAND, description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when docs/models.md is stale")
    args = parser.parse_args(argv)
    if args.check:
        problems = stale(DOC.read_text() if DOC.exists() else "", [plan_row(f) for f in moe_families()])
        print("\n".join(problems) or "docs/models.md is current")
        return 1 if problems else 0
    rows = write()
    print(f"wrote {DOC}: {len(rows)} families, {sum(r.plans for r in rows)} plan EP + AC + FSDP")
    return 0


if __name__ == "__main__":
    sys.exit(main())
