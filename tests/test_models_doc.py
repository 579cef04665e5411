"""docs/models.md is current for the installed transformers: its planning columns are what
`moefn.adapters.transformers.catalogue` plans now (every family built tiny on meta; about 10 s)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from moefn import PlanError, inspect_model
from moefn.adapters.transformers.catalogue import DOC, Row, build_tiny, moe_families, parse, plan_row, stale


@pytest.fixture(scope="module")
def rows() -> list[Row]:
    return [plan_row(family) for family in moe_families()]


def test_models_doc_is_current(rows: list[Row]) -> None:
    problems = stale(DOC.read_text(), rows)
    assert not problems, ("regenerate with `python -m moefn.adapters.transformers.catalogue`:\n"
                          + "\n".join(problems))
    assert len(rows) >= 61 and sum(row.plans for row in rows) >= 40  # transformers 5.24: 61, 40


def test_an_edited_row_is_named(rows: list[Row]) -> None:
    import transformers

    text = DOC.read_text()
    assert "| `mixtral` | yes | yes |" in text
    edited = text.replace("| `mixtral` | yes | yes |", "| `mixtral` | yes | no: edited |")
    assert stale(edited, rows) == [
        "mixtral: docs/models.md says ('yes', 'no: edited'), planning says ('yes', 'yes')"]
    dropped = "\n".join(line for line in text.splitlines() if "`olmoe`" not in line)
    assert stale(dropped, rows) == ["olmoe: missing from docs/models.md"]
    other = text.replace("for transformers ", "for transformers 0.0.0, not ", 1)
    assert stale(other, rows) == [
        f"docs/models.md is not for the installed transformers {transformers.__version__}"]


def test_unrecognised_and_refused_models_point_to_the_doc() -> None:
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                         intermediate_size=64)
    with torch.device("meta"):
        dense = AutoModelForCausalLM.from_config(config)
    with pytest.raises(PlanError) as caught:
        inspect_model(dense)
    assert "docs/models.md lists every transformers MoE family" in caught.value.problems[0].fix
    with pytest.raises(PlanError) as caught:
        inspect_model(build_tiny("dbrx"))
    fix = caught.value.problems[0].fix
    assert "docs/models.md lists every transformers MoE family" in fix
    cells = parse(DOC.read_text())["dbrx"]
    assert cells[0].startswith("no: transformers MoE family 'dbrx' is not supported") and fix in cells[0]
