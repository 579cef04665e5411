"""The import graph of moefn: no cycles, and the planning package imports nothing above it.

Every ``import`` counts, wherever it stands: at the top, inside functions, under
``TYPE_CHECKING``. An edge goes to the module a statement names (``from moefn.plan.mesh import
MeshSpec`` → ``moefn.plan.mesh``; ``from moefn.realize import realize`` → ``moefn.realize``).
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "moefn"
LOWER = "moefn.plan"  # the planning package: imports nothing else of moefn


def module_files(root: Path) -> dict[str, Path]:
    """Dotted module name → file, for every module under ``root`` (a package directory)."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = [root.name, *path.relative_to(root).with_suffix("").parts]
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _targets(node: ast.Import | ast.ImportFrom, module: str, is_package: bool) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:
        package = module.split(".") if is_package else module.split(".")[:-1]
        base = ".".join([*package[:len(package) - node.level + 1], *([base] if base else [])])
    return [base, *(f"{base}.{alias.name}" for alias in node.names)]


def import_graph(root: Path) -> dict[str, set[str]]:
    """Module → the modules of the same package it imports (anywhere in its code)."""
    files = module_files(root)
    graph: dict[str, set[str]] = {}
    for module, path in files.items():
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import | ast.ImportFrom):
                names = _targets(node, module, path.name == "__init__.py")
                # `from a.b import c`: the module a.b.c if there is one, else a.b itself
                found = [n for n in names[1:] if n in files] if isinstance(node, ast.ImportFrom) else []
                if isinstance(node, ast.ImportFrom) and not found:
                    found = [names[0]]
                edges.update(n for n in (found or names) if n in files and n != module)
        graph[module] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a path ``[a, b, …, a]``, or None (depth-first, iterative)."""
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    for start in sorted(graph):
        if state.get(start):
            continue
        path, stack = [start], [iter(sorted(graph[start]))]
        state[start] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return [*path[path.index(nxt):], nxt]
            elif not state.get(nxt):
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph[nxt])))
    return None


def test_moefn_has_no_import_cycle() -> None:
    cycle = find_cycle(import_graph(PACKAGE))
    assert cycle is None, "import cycle: " + " → ".join(cycle or ())


def test_planning_imports_nothing_else_of_moefn() -> None:
    upward = {f"{m} → {t}" for m, targets in import_graph(PACKAGE).items()
              if m == LOWER or m.startswith(LOWER + ".")
              for t in targets if not (t == LOWER or t.startswith(LOWER + "."))}
    assert not upward, sorted(upward)


def test_the_checker_sees_a_cycle_inside_a_function(tmp_path: Path) -> None:
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg.b import g\n")
    (pkg / "b.py").write_text("from typing import TYPE_CHECKING\n"
                              "if TYPE_CHECKING:\n    from pkg import c\n")
    (pkg / "c.py").write_text("def f():\n    from . import a\n")
    assert find_cycle(import_graph(pkg)) == ["pkg.a", "pkg.b", "pkg.c", "pkg.a"]
    (pkg / "c.py").write_text("def f():\n    pass\n")
    assert find_cycle(import_graph(pkg)) is None


@pytest.mark.parametrize("module, name", [
    ("moefn", "compose"), ("moefn", "diff"), ("moefn", "to_json"), ("moefn", "from_json"),
    ("moefn.realize", "realize"), ("moefn.realize", "build_device_meshes"),
    ("moefn.models", "MoETransformer"), ("moefn.models", "get_preset"),
    ("moefn.hf.pretrained", "load_pretrained"), ("moefn.comm_ledger", "CommLedger"),
    ("moefn.clip", "clip_grad_norm"), ("moefn.routing", "update_expert_bias"),
    ("moefn.train", "local_batch"), ("moefn.checkpoint", "save_checkpoint"),
    ("moefn.checkpoint", "materialize_from_checkpoint"), ("moefn.accumulate", "no_gradient_sync"),
])
def test_import_paths_the_docs_show_still_work(module: str, name: str) -> None:
    assert callable(getattr(importlib.import_module(module), name))
