"""The shape of the source tree: no import cycle between stanvid's modules, no function too long to read, and a
top-level package whose lazy names all resolve (and cover the names the README uses).

These read the source (AST), so they cost milliseconds and need no optional dependency.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import re
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "stanvid"
README = SRC.parent / "README.md"
MAX_FUNCTION_LINES = 100

# Functions allowed above MAX_FUNCTION_LINES, each with the reason (data tables and route factories only).
LONG_FUNCTIONS = {
    "stanvid.server.create_app": "FastAPI route factory: the routes are closures over the app's index",
}


def _modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package (a package is its __init__)."""
    found = {}
    for file in sorted(PACKAGE.rglob("*.py")):
        parts = file.relative_to(SRC).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = file
    return found


def _type_checking_only(tree: ast.Module) -> set[int]:
    """ids of import nodes under `if TYPE_CHECKING:` (never executed, so no import at run time)."""
    skipped = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    return skipped


def _imports(name: str, file: Path, modules: dict[str, Path]) -> set[str]:
    """The stanvid modules `name` imports anywhere in its source (module level or inside functions).

    `from a.b import c` is an import of the module `a.b.c` when there is one, else of `a.b`; either way the
    packages `a` and `a.b` are imported too (their `__init__` runs first), except the importer's own."""
    tree = ast.parse(file.read_text(), str(file))
    skipped = _type_checking_only(tree)
    package = name if file.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in modules else base)
    found |= {parent for module in found for parent in _parents(module)}
    own = set(_parents(name)) | {name}  # a module's own packages are already being imported when it runs
    return {m for m in found if m in modules and m not in own}


def _parents(module: str) -> list[str]:
    """The packages that importing `module` runs first: a.b.c -> [a, a.b]."""
    parts = module.split(".")
    return [".".join(parts[:k]) for k in range(1, len(parts))]


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, file, modules) for name, file in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as [a, b, ..., a], or None (depth-first search with colours)."""
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


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_function_local_and_relative_imports_are_edges(tmp_path):
    modules = {"stanvid.x": tmp_path / "x.py", "stanvid.y": tmp_path / "y.py", "stanvid": tmp_path / "i.py"}
    modules["stanvid.x"].write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import stanvid.z\n"
        "def f():\n    from . import y\n"
    )
    assert _imports("stanvid.x", modules["stanvid.x"], modules) == {"stanvid.y"}
    modules["stanvid.p"], modules["stanvid.p.q"] = tmp_path / "p.py", tmp_path / "q.py"
    modules["stanvid.y"].write_text("from stanvid.p.q import thing\n")
    assert _imports("stanvid.y", modules["stanvid.y"], modules) == {"stanvid.p", "stanvid.p.q"}


def test_no_import_cycle_between_modules():
    graph = import_graph()
    assert "stanvid.index.build" in graph["stanvid.embed"] | graph["stanvid.index"]  # the graph is real
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def _long_functions() -> dict[str, int]:
    """`module.qualname` -> lines, of every function or method longer than MAX_FUNCTION_LINES."""
    found = {}
    for name, file in _modules().items():
        tree = ast.parse(file.read_text(), str(file))

        def walk(node: ast.AST, prefix: str) -> None:
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                    qual = f"{prefix}.{child.name}"
                    if not isinstance(child, ast.ClassDef):
                        lines = child.end_lineno - child.lineno + 1
                        if lines > MAX_FUNCTION_LINES:
                            found[qual] = lines
                    walk(child, qual)
                else:
                    walk(child, prefix)

        walk(tree, name)
    return found


def test_no_function_is_over_100_lines():
    long = _long_functions()
    over = {name: lines for name, lines in long.items() if name not in LONG_FUNCTIONS}
    assert not over, f"functions over {MAX_FUNCTION_LINES} lines (split them into named steps): {over}"
    stale = sorted(set(LONG_FUNCTIONS) - set(long))
    assert not stale, f"allowed long functions that are no longer long (drop them from the list): {stale}"


def _resolve(module: str, name: str) -> bool:
    """Whether `module.name` exists; False only when it does not, not when an optional extra is missing."""
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name and not exc.name.startswith("stanvid"):
            pytest.importorskip(exc.name, reason=f"{module} needs an optional extra")
        raise
    if hasattr(mod, name):
        return True
    return importlib.util.find_spec(f"{module}.{name}") is not None


def test_every_exported_name_resolves():
    import stanvid

    unresolved = [name for name in stanvid.__all__ if not _resolve("stanvid", name)]
    assert not unresolved


def test_the_type_checking_block_lists_every_lazy_export():
    import stanvid

    tree = ast.parse((PACKAGE / "__init__.py").read_text())
    seen = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            seen |= {(s.module, a.name) for s in node.body if isinstance(s, ast.ImportFrom) for a in s.names}
    assert seen == {(module, name) for name, module in stanvid._EXPORTS.items()}


def test_the_readme_names_exist():
    import stanvid

    text = README.read_text()
    names = sorted(set(re.findall(r"\bstanvid\.([A-Za-z_]\w*)\b", text)))
    assert {"load_model", "train_run", "load_recipe", "classify", "mug_similarity"} <= set(names) | set(
        stanvid.__all__
    )
    missing = [name for name in names if not _resolve("stanvid", name)]
    assert not missing, f"README names stanvid.{missing} that do not exist"
    for module, imported in re.findall(r"^from (stanvid[\w.]*) import ([\w, ]+)$", text, re.M):
        for name in (n.strip() for n in imported.split(",")):
            assert _resolve(module, name), f"README: from {module} import {name}"
