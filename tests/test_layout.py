"""The house's rules, read from the source: imports run one way between sparsellm's packages, no long functions."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "sparsellm"
# Who may import whom (a package is a folder of sparsellm, or a top-level module): cli -> pipeline -> api ->
# engine -> methods -> core, with models, data and eval below api/engine and above core.
ALLOWED = {
    "core": set(),
    "data": {"core"},
    "models": {"core"},
    "methods": {"core"},
    "eval": {"core", "data", "models"},
    "engine": {"core", "methods", "models"},
    "recovery": {"core", "data", "models"},
    "inspection": {"core", "models"},
    "plots": set(),
    "api": {"core", "data", "engine", "eval", "methods", "models", "recovery"},
    "card": set(),
    "pipeline": {"core", "api", "card", "data", "eval", "inspection", "models", "plots", "recovery"},
    "cli": {"core", "api", "engine", "inspection", "models", "pipeline", "recovery"},  # models: the built-ins' names
    "__init__": {"core", "api", "models"},
    "__main__": {"cli"},
}


def room(path: Path) -> str:
    parts = path.relative_to(PACKAGE).parts
    return parts[0] if len(parts) > 1 else path.stem


def imported_rooms(path: Path) -> set[str]:
    """The sparsellm packages (or top-level modules) a module imports, relatively or absolutely, anywhere in it."""
    package = ["sparsellm", *path.relative_to(PACKAGE).parts[:-1]]
    modules = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            head = base + (node.module.split(".") if node.module else [])
            modules += [head] if node.module else [head + [alias.name] for alias in node.names]
        elif isinstance(node, ast.Import):
            modules += [alias.name.split(".") for alias in node.names]
    return {m[1] for m in modules if len(m) > 1 and m[0] == "sparsellm"} - {room(path)}


def test_imports_run_one_way_between_packages():
    edges = {}
    for path in PACKAGE.rglob("*.py"):
        edges.setdefault(room(path), set()).update(imported_rooms(path))
    assert set(edges) <= set(ALLOWED), f"give each new package its place in ALLOWED: {set(edges) - set(ALLOWED)}"
    wrong = {r: sorted(targets - ALLOWED[r]) for r, targets in edges.items() if targets - ALLOWED[r]}
    assert not wrong, f"imports against the house's direction: {wrong}"
    # and therefore no cycle: ALLOWED itself is acyclic
    seen, done = set(), set()

    def visit(r: str) -> None:
        assert r not in seen - done, f"cycle through {r}"
        if r in done:
            return
        seen.add(r)
        for t in ALLOWED[r]:
            visit(t)
        done.add(r)

    for r in ALLOWED:
        visit(r)


def test_the_checker_sees_relative_imports():
    assert imported_rooms(PACKAGE / "methods" / "sparsellm.py") >= {"core"}
    assert imported_rooms(PACKAGE / "engine" / "sequential.py") >= {"core", "methods", "models"}
    assert "engine" in imported_rooms(PACKAGE / "api.py")
