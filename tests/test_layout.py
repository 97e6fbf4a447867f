"""The layout rules of the code base, checked statically over ``src/densenet`` (issue 15).

- No function longer than :data:`MAX_LINES` lines; those over :data:`SCREEN_LINES` are listed in
  :data:`LONG_FUNCTIONS` with the reason they stay one function.
- ``# fmt: skip`` / ``# fmt: off`` only on the genuine data tables of :data:`TABLES`: everywhere
  else ``ruff format`` lays the code out.
- No import cycle among densenet modules, in the graph of the imports that run when a module is
  imported (module level, ``TYPE_CHECKING`` blocks and function bodies left out).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "densenet"
SCREEN_LINES = 60
MAX_LINES = 80
# "module:qualified.name" -> why it stays one function of more than SCREEN_LINES lines.
LONG_FUNCTIONS: dict[str, str] = {}
# Module (path under src/densenet) -> the module-level statements that are aligned data tables:
# an assignment's target name, or the function a row of a registry table calls.
TABLES: dict[str, set[str]] = {
    "catalog.py": {"FASHION_CLASSES", "CIFAR10_CLASSES"},
    "zoo.py": {"_imagenet"},
}
FORMATTER_MARKERS = ("# fmt: skip", "# fmt: off")


def _sources() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def _name(path: Path) -> str:
    """``densenet.data.images`` for ``src/densenet/data/images.py`` (packages: their name)."""
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), str(path))


def _functions(tree: ast.AST, prefix: str = ""):
    """``(qualified name, node)`` of every function and method, nested ones included."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield prefix + node.name, node
            yield from _functions(node, f"{prefix}{node.name}.")
        elif isinstance(node, ast.ClassDef):
            yield from _functions(node, f"{prefix}{node.name}.")
        else:
            yield from _functions(node, prefix)


def _function_lengths() -> dict[str, int]:
    lengths = {}
    for path in _sources():
        for qualname, node in _functions(_tree(path)):
            start = min([node.lineno, *(d.lineno for d in node.decorator_list)])
            lengths[f"{_name(path)}:{qualname}"] = node.end_lineno - start + 1
    return lengths


def test_no_function_is_longer_than_a_screen_unless_listed():
    lengths = _function_lengths()
    too_long = {f: n for f, n in lengths.items() if n > MAX_LINES}
    assert not too_long, f"functions over {MAX_LINES} lines (split them): {too_long}"
    unlisted = {f: n for f, n in lengths.items() if n > SCREEN_LINES and f not in LONG_FUNCTIONS}
    assert not unlisted, (
        f"functions over {SCREEN_LINES} lines: split them, or list them in LONG_FUNCTIONS "
        f"with the reason: {unlisted}"
    )
    stale = {f for f in LONG_FUNCTIONS if lengths.get(f, 0) <= SCREEN_LINES}
    assert not stale, f"LONG_FUNCTIONS entries that are gone or short now: {sorted(stale)}"


def _statement_name(node: ast.stmt) -> str | None:
    """The name a module-level table statement goes by (see :data:`TABLES`)."""
    if isinstance(node, (ast.Assign, ast.AnnAssign)):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        names = [t.id for t in targets if isinstance(t, ast.Name)]
        return names[0] if names else None
    if isinstance(node, ast.Expr) and isinstance(node.value, ast.Call):
        func = node.value.func
        return func.id if isinstance(func, ast.Name) else None
    return None


def test_formatter_markers_only_on_data_tables():
    misplaced = []
    used: dict[str, set[str]] = {module: set() for module in TABLES}
    for path in _sources():
        module = str(path.relative_to(PACKAGE))
        lines = path.read_text(encoding="utf-8").splitlines()
        marked = [
            i + 1 for i, line in enumerate(lines) if any(m in line for m in FORMATTER_MARKERS)
        ]
        tables = [
            node for node in _tree(path).body if _statement_name(node) in TABLES.get(module, set())
        ]
        for number in marked:
            table = next((t for t in tables if t.lineno <= number <= t.end_lineno), None)
            if table is None:
                misplaced.append(f"{module}:{number}: {lines[number - 1].strip()}")
            else:
                used[module].add(_statement_name(table))
    stale = sorted(f"{m}:{name}" for m, names in TABLES.items() for name in names - used[m])
    assert not stale, f"TABLES entries with no marked statement (remove them): {stale}"
    assert not misplaced, (
        "formatter markers outside the data tables of TABLES (let `ruff format` lay it out):\n"
        + "\n".join(misplaced)
    )


def _runs_at_import(body: list[ast.stmt]):
    """The import statements of ``body`` that run when the module is imported: module level and
    inside module-level ``if``/``try``/``with``/class bodies, not under ``if TYPE_CHECKING``."""
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.If):
            test = ast.unparse(node.test)
            if test not in ("TYPE_CHECKING", "typing.TYPE_CHECKING"):
                yield from _runs_at_import(node.body)
            yield from _runs_at_import(node.orelse)
        elif isinstance(node, ast.Try):
            for part in (node.body, node.orelse, node.finalbody, *(h.body for h in node.handlers)):
                yield from _runs_at_import(part)
        elif isinstance(node, (ast.With, ast.ClassDef)):
            yield from _runs_at_import(node.body)


def _imported(node: ast.Import | ast.ImportFrom, module: str, is_package: bool) -> list[str]:
    """The module names an import statement loads (``from pkg import sub`` loads ``pkg.sub``)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if node.level:  # relative: from the package this module is in (or is)
        package = module.split(".")
        package = package if is_package else package[:-1]
        base = ".".join(package[: len(package) - node.level + 1])
        base = f"{base}.{node.module}" if node.module else base
    else:
        base = node.module or ""
    return [base] + [f"{base}.{alias.name}" for alias in node.names]


def import_graph() -> dict[str, set[str]]:
    """densenet module -> the densenet modules importing it runs (parent packages included:
    importing ``densenet.data.images`` runs ``densenet/data/__init__.py`` first)."""
    paths = {_name(p): p for p in _sources()}
    graph: dict[str, set[str]] = {}
    for module, path in paths.items():
        edges: set[str] = set()
        for node in _runs_at_import(_tree(path).body):
            for target in _imported(node, module, path.name == "__init__.py"):
                parts = target.split(".")
                for depth in range(2, len(parts) + 1):
                    name = ".".join(parts[:depth])
                    # A package's own submodules import their siblings while it initializes:
                    # that is Python's normal order, not a cycle.
                    if name in paths and name != module and not module.startswith(name + "."):
                        edges.add(name)
        graph[module] = edges
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), and self-imports."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1 or node in graph.get(node, ()):
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return cycles


def test_no_import_cycle_among_densenet_modules():
    cycles = find_cycles(import_graph())
    assert not cycles, f"modules that import each other in a circle: {cycles}"


@pytest.mark.parametrize(
    "graph, expected",
    [
        ({"a": {"b"}, "b": {"a"}, "c": {"a"}}, [["a", "b"]]),
        ({"a": {"b"}, "b": {"c"}, "c": set()}, []),
        ({"a": {"a"}}, [["a"]]),
    ],
)
def test_find_cycles_finds_circles_and_only_circles(graph, expected):
    assert find_cycles(graph) == expected


def test_import_graph_sees_module_level_imports_only(tmp_path, monkeypatch):
    package = tmp_path / "densenet"
    (package / "sub").mkdir(parents=True)
    files = {
        "__init__.py": "",
        "a.py": "from densenet import b\n",
        "b.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from densenet import a\n"
        "def f():\n    from densenet import a\n",
        "c.py": "from densenet.sub.x import y\n",
        "sub/__init__.py": "from densenet.sub import x\n",
        "sub/x.py": "from densenet.sub import z\n",
        "sub/z.py": "import densenet.c\n",
    }
    for name, text in files.items():
        (package / name).write_text(text)
    monkeypatch.setattr(__import__(__name__), "PACKAGE", package)
    graph = import_graph()
    assert graph["densenet.a"] == {"densenet.b"}
    assert graph["densenet.b"] == set()  # TYPE_CHECKING and function bodies do not count
    assert graph["densenet.c"] == {"densenet.sub", "densenet.sub.x"}  # y: a name, not a module
    assert graph["densenet.sub.x"] == {"densenet.sub.z"}  # its own package: not an edge
    assert find_cycles(graph) == [
        ["densenet.c", "densenet.sub", "densenet.sub.x", "densenet.sub.z"]
    ]


def test_every_package_is_installed_by_pyproject():
    """A package folder missing from pyproject's explicit list installs in editable mode but is
    absent from a wheel (``import densenet.hub`` then fails for pip users)."""
    import tomllib

    listed = set(
        tomllib.loads((PACKAGE.parents[1] / "pyproject.toml").read_text())["tool"]["setuptools"][
            "packages"
        ]
    )
    packages = {_name(init) for init in PACKAGE.rglob("__init__.py")}
    assert packages <= listed, f"add {sorted(packages - listed)} to [tool.setuptools] packages"
