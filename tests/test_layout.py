"""The shape of the source tree: the layers and which may import which, no import cycle between modules, no
function or module too long to read, a top-level namespace whose names all resolve and cover what the README,
the docs and the benchmarks use, and documentation whose relative links resolve.

These read the source (AST) and the Markdown, so they cost milliseconds and need no optional dependency.
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
ROOT = SRC.parent
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
BENCHMARKS = sorted((ROOT / "benchmarks").glob("*.py"))
MAX_FUNCTION_LINES = 100
MAX_MODULE_LINES = 800

# The parts of the package, bottom first. "shared" is the few top-level modules that every layer uses; "api" is
# the `stanvid` namespace itself (lazy exports of everything).
SHARED = {"stanvid.errors", "stanvid.fileio", "stanvid.locking", "stanvid.distributed", "stanvid.precision"}
# part -> the parts it may import (itself included). Dependencies point down; no two parts import each other.
MAY_IMPORT = {
    "shared": {"shared"},
    "video": {"shared", "video"},
    "models": {"shared", "video", "models"},
    "checkpoints": {"shared", "video", "models", "checkpoints"},
    "data": {"shared", "video", "models", "data"},
    "training": {"shared", "video", "models", "checkpoints", "data", "training"},
    "search": {"shared", "video", "models", "checkpoints", "data", "search"},
    "demo": {"shared", "video", "models", "checkpoints", "data", "training", "search", "demo"},
    "cli": {"shared", "video", "models", "checkpoints", "data", "training", "search", "demo", "cli", "api"},
    "api": {"shared", "video", "models", "checkpoints", "data", "training", "search", "demo", "cli", "api"},
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
    assert (
        "stanvid.search.index.build" in graph["stanvid.search.embed"] | graph["stanvid.search.index"]
    )  # the graph is real
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
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines (split them into named steps): {long}"


def test_no_module_is_over_800_lines():
    long = {
        name: n
        for name, file in _modules().items()
        if (n := len(file.read_text().splitlines())) > MAX_MODULE_LINES
    }
    assert not long, f"modules over {MAX_MODULE_LINES} lines (one responsibility per module): {long}"


def part_of(module: str) -> str:
    """The layer a module belongs to: its sub-package under `stanvid`, "shared" or "api"."""
    if module == "stanvid":
        return "api"
    if module in SHARED:
        return "shared"
    return module.split(".")[1]


def test_the_package_is_its_layers():
    """At the top only the shared modules; every sub-package a layer of the table, with a docstring saying
    what it is and what it may import."""
    modules = _modules()
    top = {m for m in modules if m.count(".") == 1 and not (PACKAGE / m.split(".")[1]).is_dir()}
    assert top == SHARED, f"top-level modules outside the shared ones: {sorted(top - SHARED)}"
    for module in modules:
        assert part_of(module) in MAY_IMPORT, f"{module}: not in a layer of the table"
    for part in set(MAY_IMPORT) - {"shared", "api"}:
        doc = ast.get_docstring(ast.parse((PACKAGE / part / "__init__.py").read_text()))
        assert doc, f"stanvid.{part}: its __init__ needs a docstring saying what the layer is"
        if part not in ("demo", "cli"):
            assert "May import" in doc or "may import" in doc, (
                f"stanvid.{part}: say what the layer may import"
            )


def test_dependencies_point_down():
    """A part imports only the parts below it (function-local imports count, TYPE_CHECKING ones do not); the
    `stanvid` namespace itself is imported by every module as their parent package, so only an explicit
    `import stanvid` / `from stanvid import NAME` counts as using it."""
    graph = import_graph()
    assert "stanvid.models.video_clip" in graph["stanvid.checkpoints.load"]  # the graph is real
    wrong = []
    for module, targets in graph.items():
        part = part_of(module)
        for target in targets - {"stanvid"}:
            if part_of(target) not in MAY_IMPORT[part]:
                wrong.append(f"{module} ({part}) -> {target} ({part_of(target)})")
        if part != "api" and "stanvid" in _explicit_root_imports(_modules()[module]):
            if part_of("stanvid") not in MAY_IMPORT[part]:
                wrong.append(f"{module} ({part}) -> the stanvid namespace")
    assert not wrong, "imports against the layer table:\n" + "\n".join(sorted(wrong))


def test_the_layer_check_sees_upward_imports(tmp_path):
    low = tmp_path / "low.py"
    low.write_text("def f():\n    from stanvid.training.loop import fit\n")
    modules = {"stanvid.models.low": low, "stanvid.training.loop": tmp_path / "loop.py"}
    found = _imports("stanvid.models.low", low, modules)
    assert found == {"stanvid.training.loop"}
    assert part_of("stanvid.training.loop") not in MAY_IMPORT[part_of("stanvid.models.low")]
    low.write_text("from stanvid import __version__\n")
    assert "stanvid" in _explicit_root_imports(low)


def _explicit_root_imports(file: Path) -> set[str]:
    """{"stanvid"} when the file imports the namespace itself (`import stanvid`, `from stanvid import NAME`
    where NAME is no sub-package)."""
    tree = ast.parse(file.read_text())
    skipped = _type_checking_only(tree)
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import) and any(a.name == "stanvid" for a in node.names):
            return {"stanvid"}
        if isinstance(node, ast.ImportFrom) and node.module == "stanvid" and not node.level:
            if any(
                not (PACKAGE / a.name).is_dir() and not (PACKAGE / f"{a.name}.py").is_file()
                for a in node.names
            ):
                return {"stanvid"}
    return set()


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


def _documents() -> list[Path]:
    return [README, *DOCS]


def test_the_readme_names_exist():
    import stanvid

    text = README.read_text()
    names = set(re.findall(r"\bstanvid\.([A-Za-z_]\w*)\b", text))
    assert {"load_model", "train_run", "load_recipe", "classify", "mug_similarity"} <= names | set(
        stanvid.__all__
    )


@pytest.mark.parametrize("path", [*_documents(), *BENCHMARKS], ids=lambda p: p.relative_to(ROOT).as_posix())
def test_readme_docs_and_benchmarks_use_the_stanvid_namespace(path):
    """What a user reads or runs reaches the library through `stanvid.NAME` only: no module path (they may
    change), and every name it uses exists."""
    text = path.read_text()
    deep = re.findall(r"^\s*(?:from stanvid\.[\w.]+ import [\w, ()]+|import stanvid\.[\w.]+)", text, re.M)
    assert not deep, f"{path.name}: import from the stanvid namespace instead of {deep}"
    names = sorted(set(re.findall(r"\bstanvid\.([A-Za-z_]\w*)\b", text)))
    if path.suffix == ".md":  # prose names modules (`stanvid.search.index`) as places; code names the API
        code = "\n".join(re.findall(r"```(?:python|py)\n(.*?)```", text, re.S))
        names = sorted(set(re.findall(r"\bstanvid\.([A-Za-z_]\w*)\b", code)))
    missing = [name for name in names if not _resolve("stanvid", name)]
    assert not missing, f"{path.name} uses stanvid.{missing}, which do not exist"
    for imported in re.findall(r"^\s*from stanvid import ([\w, ]+)$", text, re.M):
        for name in (n.strip() for n in imported.split(",")):
            assert _resolve("stanvid", name), f"{path.name}: from stanvid import {name}"


def test_prose_names_modules_that_exist():
    """A module path named in the README or docs (`stanvid.search.index`) is a real module or a name in one."""
    modules = _modules()
    wrong = []
    for path in _documents():
        for dotted in set(re.findall(r"\bstanvid(?:\.[A-Za-z_]\w*){2,}", path.read_text())):
            parts = dotted.split(".")
            if not any(
                ".".join(parts[:k]) in modules and k >= len(parts) - 1 for k in range(2, len(parts) + 1)
            ):
                wrong.append(f"{path.name}: {dotted}")
    assert not wrong, f"module paths that do not exist: {wrong}"


_LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)|!\[[^\]]*\]\(([^)\s]+)\)")


@pytest.mark.parametrize("path", _documents(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_resolve(path):
    """Every relative link (and image) of the README and the docs points at a file that exists, and every
    `#anchor` into a Markdown file at one of its headings."""
    broken = []
    for match in _LINK.finditer(path.read_text()):
        target = match.group(1) or match.group(2)
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        dest = (path.parent / file).resolve() if file else path
        if not dest.exists():
            broken.append(target)
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(target)
    assert not broken, f"{path.name}: broken links {broken}"


def _anchors(path: Path) -> set[str]:
    """GitHub's anchors of a Markdown file's headings: lower case, punctuation dropped, spaces to hyphens."""
    out = set()
    for heading in re.findall(r"^#{1,6} +(.+?) *$", path.read_text(), re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", "")).replace(" ", "-")
        out.add(slug)
    return out
