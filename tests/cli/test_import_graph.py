"""The modules of ``curvops.cli`` import each other without cycles."""

import ast
from pathlib import Path

import curvops.cli

CLI = Path(curvops.cli.__file__).parent


def _cli_imports(path: Path) -> set[str]:
    """Names of the ``curvops.cli`` modules a file imports, at any nesting level."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "curvops.cli":  # from curvops.cli import plots
                out |= {a.name for a in node.names if (CLI / f"{a.name}.py").exists()}
            elif node.module.startswith("curvops.cli."):
                out.add(node.module.split(".")[2])
        elif isinstance(node, ast.Import):
            out |= {a.name.split(".")[2] for a in node.names if a.name.startswith("curvops.cli.")}
    return out


def _graph() -> dict[str, set[str]]:
    return {p.stem: _cli_imports(p) - {p.stem} for p in CLI.glob("*.py") if p.stem != "__init__"}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph (depth-first search), or ``None``."""
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_cli_modules_import_each_other_without_cycles():
    graph = _graph()
    assert {"main", "tour", "analyze", "device"} <= set(graph)
    assert "device" in graph["tour"] and "device" in graph["analyze"]
    assert _cycle(graph) is None, f"import cycle: {' -> '.join(_cycle(graph))}"
