"""mypy sees `compose(...)(model)` as `Result[ShardPlan, PlanError]` (and fails otherwise)."""

from __future__ import annotations

from pathlib import Path

from mypy import api

ROOT = Path(__file__).parents[1]


def _mypy(source: Path) -> tuple[str, int]:
    out, err, status = api.run(["--strict", "--config-file", str(ROOT / "pyproject.toml"),
                                str(source)])
    return out + err, status


def test_compose_is_typed_result_of_plan_and_error() -> None:
    out, status = _mypy(ROOT / "tests" / "typesafety" / "compose_is_typed.py")
    assert status == 0, out


def test_a_wrong_type_is_caught(tmp_path: Path) -> None:
    text = (ROOT / "tests" / "typesafety" / "compose_is_typed.py").read_text()
    wrong = text.replace("assert_type(result, Result[ShardPlan, PlanError])",
                         "assert_type(result, Result[ShardPlan, str])")
    assert wrong != text
    source = tmp_path / "wrong.py"
    source.write_text(wrong)
    out, status = _mypy(source)
    assert status == 1 and "Expression is of type" in out, out
