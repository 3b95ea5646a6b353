"""The package's imports point down the data flow: no module imports one that (directly or through others)
imports it back, function-local imports included (issue 17: "no import cycles")."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SKIP = {"tests", "bench", ".venv", "build", ".git"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(["diva", *parts])


def import_graph() -> dict[str, set[str]]:
    files = [p for p in ROOT.rglob("*.py") if not set(p.relative_to(ROOT).parts) & SKIP]
    modules = {module_name(p): p for p in files}
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            for target in targets:
                while target and target not in modules:  # diva.student.training.train.train -> the module
                    target = target.rpartition(".")[0]
                if target and target != name and target != "diva":
                    graph[name].add(target)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_package_has_no_import_cycle() -> None:
    graph = import_graph()
    assert "diva.student.training.train" in graph and "diva.student.run_folder" in graph["diva.student.training.train"]
    cycle = find_cycle(graph)
    assert cycle is None, " -> ".join(cycle or [])


def test_student_imports_point_down_its_rooms() -> None:
    """Inside student/: model <- inference <- training <- eval (a room imports only rooms before it)."""
    order = {"model": 0, "inference": 1, "training": 2, "eval": 3}
    room = lambda name: order.get(name.split(".")[2]) if name.startswith("diva.student.") else None  # noqa: E731
    upward = [f"{a} -> {b}" for a, targets in import_graph().items() for b in targets
              if room(a) is not None and room(b) is not None and room(b) > room(a)]  # fmt: skip
    assert not upward, upward
