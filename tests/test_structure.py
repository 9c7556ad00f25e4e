"""The package's shape: imports run one way (no cycles, the engine below methods and callers), and no
module grows past ~400 lines without saying why. A small AST scan of src/d2prune."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "d2prune"
MAX_LINES = 400
# What the engine may use: the method interface and the shared solver, never a method or a caller.
ENGINE_MAY_IMPORT = (
    "d2prune.engine",
    "d2prune.methods.base",
    "d2prune.methods.least_squares",
    "d2prune.errors",
    "d2prune.patterns",
    "d2prune.config",
    "d2prune.report",
)


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """The package modules ``path`` imports anywhere (module level or inside functions)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name in modules)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                if sub in modules:  # ``from d2prune.engine import walk``: the submodule itself
                    found.add(sub)
                elif target in modules:
                    found.add(target)
    found.discard(name)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(path, modules) for name, path in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
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
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_scan_finds_a_cycle_when_there_is_one():
    # The checker itself: a planted cycle and a clean chain.
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []


def test_the_scan_sees_function_level_and_relative_imports(tmp_path):
    graph = _graph()
    assert graph, "no modules found"
    # The CLI imports the engine's walk somewhere (at module level or inside a function).
    assert any(m.startswith("d2prune.") for m in graph["d2prune.cli"])


def test_no_import_cycles():
    cycles = _cycles(_graph())
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_engine_imports_only_the_method_interface_and_itself():
    bad = {
        name: sorted(t for t in targets if not t.startswith(ENGINE_MAY_IMPORT))
        for name, targets in _graph().items()
        if name.startswith("d2prune.engine")
    }
    bad = {k: v for k, v in bad.items() if v}
    assert not bad, f"engine modules import callers or methods: {bad}"


@pytest.mark.parametrize("name", sorted(_modules()))
def test_modules_are_short_or_say_why(name):
    path = _modules()[name]
    lines = len(path.read_text().splitlines())
    doc = ast.get_docstring(ast.parse(path.read_text())) or ""
    assert lines <= MAX_LINES or "Longer than" in doc, (
        f"{path.relative_to(PACKAGE.parent)} has {lines} lines: split it, or give the reason in its "
        f"docstring ('Longer than {MAX_LINES} lines because ...')"
    )
