"""The code's shape: layers that point one way, no import cycle, short functions (no engine)."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "parityrl"
MAX_FUNCTION_LINES = 80


def test_the_layers_contract_holds():
    """pyproject.toml [tool.importlinter]: every import, function-level ones included, points
    down the data path's layers."""
    lint = Path(sys.executable).with_name("lint-imports")
    done = subprocess.run([str(lint), "--no-cache"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "1 kept, 0 broken" in done.stdout


def _import_cycles() -> list[list[str]]:
    """Strongly connected components of more than one module in parityrl's import graph."""
    import grimp

    graph = grimp.build_graph("parityrl", cache_dir=None)
    edges = {m: set(graph.find_modules_directly_imported_by(m)) & graph.modules
             for m in graph.modules}
    order, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(module: str) -> None:  # Tarjan
        order[module] = low[module] = len(order)
        stack.append(module)
        on_stack.add(module)
        for other in edges[module]:
            if other not in order:
                visit(other)
                low[module] = min(low[module], low[other])
            elif other in on_stack:
                low[module] = min(low[module], order[other])
        if low[module] == order[module]:
            component = []
            while not component or component[-1] != module:
                component.append(stack.pop())
                on_stack.discard(component[-1])
            if len(component) > 1:
                cycles.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for module in sorted(graph.modules):
        if module not in order:
            visit(module)
    return cycles


def test_no_import_cycle_between_modules():
    assert _import_cycles() == []


def _long_functions() -> dict[str, int]:
    found = {}
    for path in sorted(SRC.rglob("*.py")):
        module = ".".join(path.relative_to(SRC.parent).with_suffix("").parts)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    found[f"{module}:{node.name}"] = lines
    return found


def test_no_function_over_80_lines_but_those_the_architecture_note_lists():
    """docs/architecture.md names each longer function with its reason."""
    note = (ROOT / "docs" / "architecture.md").read_text()
    section = note.split("## Functions over 80 lines", 1)[-1].split("\n## ", 1)[0]
    listed = set(re.findall(r"`(parityrl[\w.]*:\w+)`", section))
    long = _long_functions()
    assert set(long) <= listed, {k: v for k, v in long.items() if k not in listed}
    assert listed <= set(long), f"listed but no longer long: {sorted(listed - set(long))}"


def _unexplained_local_imports() -> list[str]:
    """Imports of parityrl's own modules inside a function body without a comment (on the line,
    or above the block of imports it belongs to) that says why it is not at the top of the
    module."""
    found = []
    for path in sorted(SRC.rglob("*.py")):
        lines = path.read_text().splitlines()
        for node in ast.walk(ast.parse("\n".join(lines))):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for inner in ast.walk(node):
                own = (isinstance(inner, ast.ImportFrom) and (inner.module or "").startswith(
                    "parityrl")) or (isinstance(inner, ast.Import) and any(
                        a.name.startswith("parityrl") for a in inner.names))
                if not own:
                    continue
                first = inner.lineno - 1
                while first > 0 and lines[first - 1].strip().startswith(("from ", "import ")):
                    first -= 1  # the imports just above belong to the same block
                block = lines[first:inner.end_lineno]
                above = lines[first - 1].strip()
                if not any("#" in line for line in block) and not above.startswith("#"):
                    found.append(f"{path.relative_to(SRC.parent)}:{inner.lineno}")
    return found


def test_function_level_imports_of_our_own_modules_say_why():
    """Imports belong at the top of a module; one inside a function keeps a module light (the
    CLI's --help) or defers vLLM, Ray or TRL, and says so."""
    assert _unexplained_local_imports() == []
