"""The floors of docs/ARCHITECTURE.md hold: no upward import, no cycle, no hidden in-function import.

``lint-imports`` (run by ``make test`` before pytest) enforces the same floors from the contracts in
``pyproject.toml``; this test reads the source independently (``tests/import_graph.py``, ``ast``), so
a wrong arrow fails even where import-linter is not installed, and it also checks what the
contracts cannot express: imports hidden inside function bodies and cycles inside one floor.
"""
from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import import_graph  # noqa: E402

ROOT = import_graph.ROOT


@pytest.fixture(scope="module")
def graph() -> import_graph.Graph:
    return import_graph.build()


def test_no_import_points_up_a_floor(graph: import_graph.Graph) -> None:
    assert [f"{i.source}:{i.line} -> {i.target}" for i in import_graph.upward(graph)] == []


def test_agents_and_envs_are_independent(graph: import_graph.Graph) -> None:
    def room(module: str) -> str:
        return ".".join(module.split(".")[:2])

    crossing = [i for i in graph.imports if {room(i.source), room(i.target)} == {"fgmf_marl.agents", "fgmf_marl.envs"}]
    assert [f"{i.source}:{i.line} -> {i.target}" for i in crossing] == []


def test_no_import_cycles(graph: import_graph.Graph) -> None:
    assert import_graph.cycles(graph) == []


def test_no_project_import_inside_a_function(graph: import_graph.Graph) -> None:
    assert [f"{i.source}:{i.line} -> {i.target}" for i in graph.imports if i.in_function] == []


def test_every_deferred_third_party_import_says_why() -> None:
    """An import inside a function is allowed only for a heavy optional dependency, marked ``# deferred:``."""
    unmarked = []
    for path in sorted(p for pkg in import_graph.PACKAGES for p in (ROOT / pkg).rglob("*.py")):
        lines = path.read_text().splitlines()
        for node in ast.walk(ast.parse("\n".join(lines))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for inner in ast.walk(node):
                    if isinstance(inner, (ast.Import, ast.ImportFrom)) and "# deferred:" not in lines[inner.lineno - 1]:
                        unmarked.append(f"{path.relative_to(ROOT)}:{inner.lineno}")
    assert unmarked == []


def test_the_graph_sees_a_planted_upward_import(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The checker can fail: a framework module importing ``agents`` inside a function is caught twice."""
    fake_root = tmp_path / "repo"
    for pkg in import_graph.PACKAGES:
        shutil.copytree(ROOT / pkg, fake_root / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    planted = fake_root / "fgmf_marl" / "planted.py"
    planted.write_text("def f():\n    from fgmf_marl.agents.policy_view import PolicyView\n    return PolicyView\n")
    monkeypatch.setattr(import_graph, "ROOT", fake_root)
    fake = import_graph.build()
    assert any(i.source == "fgmf_marl.planted" for i in import_graph.upward(fake))
    assert any(i.source == "fgmf_marl.planted" and i.in_function for i in fake.imports)


def test_import_linter_contracts_are_kept() -> None:
    lint = Path(sys.executable).with_name("lint-imports")
    result = subprocess.run([str(lint), "--no-cache"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-2000:]
