"""The shape of the code: no import circle anywhere, plugins meet only through their ``api`` modules.

``make test`` also runs the import-linter contracts of pyproject.toml (memdec_core's layers, no
plugin importing the CLI). This test adds what they cannot say, and counts imports placed inside
functions exactly like those at the top of a module: a lazy import keeps torch out of start-up,
it does not make a circle acceptable. Imports under ``if TYPE_CHECKING:`` run never and are skipped.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"memdec_core": ROOT / "memdec_core", "memdec_cli": ROOT / "cli" / "memdec_cli",
            **{folder.name: folder for folder in sorted((ROOT / "plugins").glob("memdec_*")) if folder.is_dir()}}
PLUGINS = sorted(name for name in PACKAGES if name not in ("memdec_core", "memdec_cli"))


def module_name(package: str, file: Path) -> str:
    parts = [package, *file.relative_to(PACKAGES[package]).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(package, file): file for package, folder in PACKAGES.items() for file in folder.rglob("*.py")}


def imported_names(module: str, file: Path) -> set[str]:
    """Every module ``file`` imports at run time, module-level and inside functions alike."""
    tree = ast.parse(file.read_text(encoding="utf-8"))
    type_only = {id(node) for block in ast.walk(tree) if isinstance(block, ast.If)
                 and "TYPE_CHECKING" in ast.unparse(block.test) for node in ast.walk(block)}
    names = set()
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(module, file, node)
            names.update(f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names)
    return names


def _absolute(module: str, file: Path, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    package = module if file.name == "__init__.py" else module.rpartition(".")[0]
    for _ in range(node.level - 1):
        package = package.rpartition(".")[0]
    return f"{package}.{node.module}" if node.module else package


def known(name: str) -> str | None:
    """The memdec module an imported name lies in (``a.b.c`` → ``a.b`` when ``c`` is a name in it)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


GRAPH = {module: {target for name in imported_names(module, file) for target in [known(name)]
                  if target and target != module} for module, file in MODULES.items()}


def cycles(graph: dict[str, set[str]], modules: set[str]) -> list[list[str]]:
    """The import circles among ``modules`` (Tarjan's strongly connected components of two or more)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        for target in sorted(graph[module] & modules):
            if target not in index:
                visit(target)
                low[module] = min(low[module], low[target])
            elif target in stack:
                low[module] = min(low[module], index[target])
        if low[module] == index[module]:
            component = []
            while not component or component[-1] != module:
                component.append(stack.pop())
            if len(component) > 1:
                found.append(sorted(component))

    for module in sorted(modules):
        if module not in index:
            visit(module)
    return found


@pytest.mark.parametrize("package", sorted(PACKAGES))
def test_no_import_circle(package):
    assert cycles(GRAPH, {module for module in MODULES if module.split(".")[0] == package}) == []


def test_imports_inside_functions_count_and_type_only_ones_do_not(tmp_path):
    """What the checks read can fail them: a lazy import is an edge, an annotation's import is not."""
    file = tmp_path / "probe.py"
    file.write_text("from typing import TYPE_CHECKING\n\nif TYPE_CHECKING:\n    from memdec_core import api\n\n\n"
                    "def late():\n    from memdec_core import errors\n")
    assert imported_names("memdec_core.probe", file) == {"typing", "memdec_core.errors"}


def test_the_cycle_finder_finds_a_circle_of_three():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph, set(graph)) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}, {"a", "b"}) == []


@pytest.mark.parametrize("plugin", PLUGINS)
def test_a_plugin_reaches_another_only_through_its_api(plugin):
    crossing = sorted(f"{module} → {target}" for module, targets in GRAPH.items() if module.split(".")[0] == plugin
                      for target in targets if target.split(".")[0] in PLUGINS and target.split(".")[0] != plugin
                      and target != f"{target.split('.')[0]}.api")
    assert crossing == []
