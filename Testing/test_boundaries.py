"""DESIGN.md's boundaries: gem3d never imports Slicer, Qt, VTK or CTK, and parses as Python 3.9."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

CORE = Path(__file__).resolve().parents[1] / "GEM3DCore" / "gem3d"
FORBIDDEN = {"slicer", "qt", "vtk", "ctk", "PySide6", "PyQt5", "PythonQt"}
SOURCES = sorted(CORE.rglob("*.py"))


def imported_roots(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module.split(".")[0]


def test_sources_found():
    assert len(SOURCES) > 30


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(CORE)))
def test_no_gui_imports_and_python39_syntax(path):
    tree = ast.parse(path.read_text(), filename=str(path), feature_version=(3, 9))
    assert not set(imported_roots(tree)) & FORBIDDEN
