"""The import graph of fusedrl, read from the sources with ``ast`` (nothing is imported).

- ``fusedrl.cli`` (one module per command, shared helpers in ``fusedrl.cli.common``) has
  no import cycle, counting the imports inside functions too: a command module that
  imports the command group lazily to break a cycle is still a cycle;
- no cycle among the modules fusedrl runs at import time (module-level imports);
- no CLI module imports a private name of another module;
- the dependency directions that hold: the library never imports the CLI, models and
  generation do not depend on the CLI, ``fusedrl.layout`` depends on no other module;
- ``fusedrl.scheduler`` (every module of it) imports no torch, checked by importing it.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def package_dirs(root: Path = ROOT) -> dict[str, Path]:
    """Import name -> source folder: ``fusedrl/`` plus pyproject's ``package-dir`` map
    (``fusedrl.scheduler`` lives in ``scheduler/``, ``fusedrl.kernels`` in ``kernels/``)."""
    dirs = {"fusedrl": root / "fusedrl"}
    pyproject = tomllib.loads((root / "pyproject.toml").read_text())
    for name, folder in pyproject["tool"]["setuptools"].get("package-dir", {}).items():
        dirs[name] = root / folder
    return dirs


def find_modules(dirs: dict[str, Path]) -> dict[str, Path]:
    """Every module's import name -> its file (a package is its ``__init__.py``)."""
    modules = {}
    for package, folder in dirs.items():
        for path in sorted(folder.rglob("*.py")):
            parts = path.relative_to(folder).with_suffix("").parts
            if "__pycache__" in parts:
                continue
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join((package, *parts))] = path
    return modules


def _is_type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def imported_names(module: str, path: Path, *, lazy: bool) -> list[tuple[str, str | None]]:
    """(module, name) pairs ``module`` imports: ``import a.b`` -> ("a.b", None),
    ``from a import b`` -> ("a", "b"), relative imports resolved. ``lazy``: also the
    imports inside functions; ``if TYPE_CHECKING:`` blocks never count."""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    found = []

    def visit(node: ast.AST, top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if _is_type_checking(child):
                continue
            at_top = top and not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                    ast.Lambda))
            if isinstance(child, ast.Import) and (at_top or lazy):
                found.extend((alias.name, None) for alias in child.names)
            elif isinstance(child, ast.ImportFrom) and (at_top or lazy):
                if child.level:
                    base = package[:len(package) - (child.level - 1)]
                    source = ".".join(base + ([child.module] if child.module else []))
                else:
                    source = child.module
                found.extend((source, alias.name) for alias in child.names)
            visit(child, at_top)

    visit(ast.parse(path.read_text(), filename=str(path)), True)
    return found


def import_graph(modules: dict[str, Path], *, lazy: bool) -> dict[str, set[str]]:
    """Module -> the modules of ``modules`` it imports (``from pkg import sub`` is an edge
    to ``pkg.sub`` when that is a module, else to ``pkg``; an import of a module outside
    ``modules`` is no edge). A submodule's parent packages are not edges: Python runs
    them first, but a package that imports its own submodules is no cycle."""
    graph = {}
    for module, path in modules.items():
        targets = set()
        for source, name in imported_names(module, path, lazy=lazy):
            target = f"{source}.{name}" if name and f"{source}.{name}" in modules else source
            parts = target.split(".")
            while parts and ".".join(parts) not in modules:
                parts.pop()  # `import a.b.func`-style paths: the longest module prefix
            if parts and ".".join(parts) != module:
                targets.add(".".join(parts))
        graph[module] = targets
    return graph


def find_cycles(graph: dict[str, set[str]], nodes: set[str] | None = None) -> list[list[str]]:
    """One cycle ``[a, b, ..., a]`` per strongly connected component of more than one
    module (Tarjan), restricted to ``nodes``."""
    nodes = set(graph) if nodes is None else nodes
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def strongconnect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in nodes:
                continue
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(_cycle_in(graph, component))

    for v in sorted(nodes):
        if v not in index:
            strongconnect(v)
    return cycles


def _cycle_in(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """A shortest cycle through the first module of a strongly connected component."""
    start = min(component)
    paths, seen = {start: [start]}, {start}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & component):
                if w == start:
                    return paths[v] + [start]
                if w not in seen:
                    seen.add(w)
                    paths[w] = paths[v] + [w]
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"no cycle through {start}")  # a component always has one


def describe(cycles: list[list[str]]) -> str:
    return "; ".join(" -> ".join(c) for c in cycles)


MODULES = find_modules(package_dirs())
LAZY = import_graph(MODULES, lazy=True)
TOP_LEVEL = import_graph(MODULES, lazy=False)


def _within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


# ------------------------------------------------------------------------------ the checker


def test_checker_names_a_lazy_cycle(tmp_path):
    """The checks below can fail: a command module importing the command group inside a
    function (what ``realloc_cli`` did with ``fusedrl.cli``) is a cycle, named in order."""
    pkg = tmp_path / "pkg"
    (pkg / "cli").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "cli" / "__init__.py").write_text("")
    (pkg / "cli" / "main.py").write_text("from .realloc import realloc\n")
    (pkg / "cli" / "realloc.py").write_text(
        "def realloc():\n    from pkg.cli.main import fail\n")
    (pkg / "cli" / "common.py").write_text("from typing import TYPE_CHECKING\n"
                                           "if TYPE_CHECKING:\n    from pkg.cli import main\n")
    modules = find_modules({"pkg": pkg})
    assert find_cycles(import_graph(modules, lazy=True)) == \
        [["pkg.cli.main", "pkg.cli.realloc", "pkg.cli.main"]]
    assert find_cycles(import_graph(modules, lazy=False)) == []  # lazy: not at import time


def test_the_graph_covers_the_mapped_packages():
    assert {"fusedrl.cli.main", "fusedrl.cli.common", "fusedrl.scheduler.plan",
            "fusedrl.kernels"} <= set(MODULES)
    # relative imports of scheduler/ resolve inside fusedrl.scheduler
    assert "fusedrl.scheduler.gen_cost" in LAZY["fusedrl.scheduler.interstage"]


# ------------------------------------------------------------------------------ cycles


def test_cli_package_has_no_import_cycle():
    cli = {m for m in MODULES if _within(m, "fusedrl.cli")}
    assert {"fusedrl.cli.main", "fusedrl.cli.common", "fusedrl.cli.train"} <= cli
    cycles = find_cycles(LAZY, cli)
    assert not cycles, f"import cycle in fusedrl.cli (imports in functions count): " \
                       f"{describe(cycles)}"


def test_no_import_time_cycle():
    cycles = find_cycles(TOP_LEVEL)
    assert not cycles, "import cycle at import time: " + describe(cycles)


# ------------------------------------------------------------------------------ private names


def test_cli_imports_no_private_name_of_another_module():
    bad = []
    for module, path in MODULES.items():
        if not _within(module, "fusedrl.cli"):
            continue
        for source, name in imported_names(module, path, lazy=True):
            if name and name.startswith("_") and _within(source, "fusedrl"):
                bad.append(f"{module} imports {source}.{name}")
    assert not bad, "; ".join(bad)


# ------------------------------------------------------------------------------ directions


def test_only_the_entry_point_imports_the_cli():
    """The library never depends on its command line (``python -m fusedrl`` does)."""
    users = sorted(m for m, targets in LAZY.items() if not _within(m, "fusedrl.cli")
                   and any(_within(t, "fusedrl.cli") for t in targets))
    assert users == ["fusedrl.__main__"]


@pytest.mark.parametrize("package,forbidden", [
    ("fusedrl.models", "fusedrl.cli"),
    ("fusedrl.generation", "fusedrl.cli"),
    ("fusedrl.scheduler", "fusedrl.cli"),
])
def test_package_does_not_import(package, forbidden):
    bad = sorted(f"{m} -> {t}" for m, targets in LAZY.items() if _within(m, package)
                 for t in targets if _within(t, forbidden))
    assert not bad, f"{package} must not import {forbidden}: {', '.join(bad)}"


def test_layout_imports_no_other_fusedrl_module():
    assert {t for t in LAZY["fusedrl.layout"] if _within(t, "fusedrl")} == set()


# ------------------------------------------------------------------------------ no torch


def test_scheduler_does_not_import_torch():
    """Every module of ``fusedrl.scheduler`` imports without torch (docs/design.md)."""
    names = sorted(m for m in MODULES if _within(m, "fusedrl.scheduler"))
    assert len(names) > 10
    code = (f"import importlib, sys\nfor m in {names!r}:\n    importlib.import_module(m)\n"
            "loaded = [m for m in sys.modules if m == 'torch' or m.startswith('torch.')]\n"
            "assert not loaded, loaded[:3]")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_command_group_starts_without_torch():
    """``fusedrl --help`` and the simulator commands do not wait for torch or numpy: the
    command modules import them where a command runs."""
    code = ("import sys, fusedrl.cli.main\nheavy = [m for m in ('torch', 'numpy', 'ray') "
            "if m in sys.modules]\nassert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_every_package_is_in_the_distribution():
    """A package missing from pyproject's list is absent from a wheel: ``fusedrl`` itself
    fails there when it is ``fusedrl.cli``."""
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
                 ["packages"])
    packages = {m for m, path in MODULES.items() if path.name == "__init__.py"}
    assert packages - listed == set(), "add to [tool.setuptools] packages"
