"""The package layout the docs promise: imports point one way, and every room exists."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "fedpose"

# every room of the package: its subpackages and top-level modules
ROOMS = sorted(
    p.stem for p in PACKAGE.iterdir() if p.suffix == ".py" or (p / "__init__.py").exists()
)
ROOMS.remove("__init__")

# room -> rooms (fedpose subpackages or top-level modules) it must never import
FORBIDDEN = {
    # every room reads its section of the config, so the config may import none of them
    "config": set(ROOMS) - {"config"},
    "data": {"fl", "engine", "tools", "cli", "model", "report", "train"},
    "model": {"fl", "engine", "tools", "cli", "report", "train"},
    # the evaluator that predicts (model/) and scores (metrics/) sits above both, in engine/
    "metrics": {"fl", "engine", "tools", "cli", "report", "train", "model"},
    "fl": {"engine", "tools", "cli", "report", "train"},
    "engine": {"tools", "cli"},
    "report": {"engine", "tools", "cli", "fl"},
}


def _room_files(room: str) -> list[Path]:
    if (PACKAGE / room).is_dir():
        return sorted((PACKAGE / room).rglob("*.py"))
    return [PACKAGE / f"{room}.py"]


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
    for path in _room_files(room):
        wrong = _imported_rooms(path) & FORBIDDEN[room]
        if wrong:
            bad[str(path.relative_to(PACKAGE))] = sorted(wrong)
    assert bad == {}


def _module_name(path: Path) -> str:
    parts = ["fedpose", *path.relative_to(PACKAGE).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _module_graph() -> dict[str, set[str]]:
    """fedpose module -> the fedpose modules it imports anywhere in its text (also inside
    functions: a deferred import closes a circle all the same, only later)."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # `from fedpose.x import y` imports the module fedpose.x.y when there is one
                targets |= {
                    f"{node.module}.{alias.name}"
                    if f"{node.module}.{alias.name}" in modules
                    else node.module
                    for alias in node.names
                }
        graph[name] = {m for m in targets if m in modules and m != name}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one node (Tarjan), sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def test_no_import_cycle_between_rooms():
    rooms: dict[str, set[str]] = {}
    for module, targets in _module_graph().items():
        room = module.split(".")[1] if "." in module else module
        rooms.setdefault(room, set()).update(
            t.split(".")[1] for t in targets if "." in t and t.split(".")[1] != room
        )
    assert _cycles({r: rooms.get(r, set()) & set(rooms) for r in rooms}) == []


def test_no_import_cycle_between_modules():
    assert _cycles(_module_graph()) == []


def test_the_cycle_check_sees_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_only_the_cli_parses_arguments():
    users = [
        str(p.relative_to(PACKAGE))
        for p in sorted(PACKAGE.rglob("*.py"))
        if "argparse" in _modules(p)
    ]
    assert users and all(u.startswith("cli/") for u in users), users


def _modules(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
    return out
