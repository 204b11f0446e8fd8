"""The package layout the docs promise: imports point one way, and every room exists."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "fedpose"

# room -> rooms (fedpose subpackages or top-level modules) it must never import
FORBIDDEN = {
    "data": {"fl", "engine", "tools", "cli", "model", "report", "train"},
    "model": {"fl", "engine", "tools", "cli", "report", "train"},
    "metrics": {"fl", "engine", "tools", "cli", "report", "train"},
    "fl": {"engine", "tools", "cli", "report", "train"},
    "engine": {"tools", "cli"},
    "report": {"engine", "tools", "cli", "fl"},
}


def _imported_rooms(path: Path) -> set[str]:
    rooms = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        for name in names:
            parts = name.split(".")
            if parts[0] == "fedpose" and len(parts) > 1:
                rooms.add(parts[1])
    return rooms


@pytest.mark.parametrize("room", sorted(FORBIDDEN))
def test_imports_point_one_way(room):
    bad = {}
    for path in sorted((PACKAGE / room).rglob("*.py")):
        wrong = _imported_rooms(path) & FORBIDDEN[room]
        if wrong:
            bad[str(path.relative_to(PACKAGE))] = sorted(wrong)
    assert bad == {}


def test_only_the_cli_parses_arguments():
    users = [
        str(p.relative_to(PACKAGE))
        for p in sorted(PACKAGE.rglob("*.py"))
        if "argparse" in _modules(p)
    ]
    assert users == ["cli.py"]


def _modules(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
    return out
