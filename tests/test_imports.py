"""The package's import graph has no cycle, the light entry points import no torch, and no module defines a
function or class twice.

The graph is read from the source with `ast`, not from what an import happens to load: an import inside
a function counts as much as one at the top (it is the same dependency, only deferred), so a cycle that
lazy imports hide today is still found. Imports under `if TYPE_CHECKING:` never run and are left out.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections import deque
from pathlib import Path

import pytest

import personalize

PACKAGE_DIR = Path(personalize.__file__).parent
PACKAGE = PACKAGE_DIR.name


def module_files(package_dir: Path = PACKAGE_DIR) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of the package (a package is its __init__.py)."""
    modules = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = (package_dir.name, *path.relative_to(package_dir).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _import_nodes(tree: ast.AST):
    """Every Import/ImportFrom node, at any depth, except those under `if TYPE_CHECKING:`."""
    todo = [tree]
    while todo:
        node = todo.pop()
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            todo.extend(node.orelse)  # the else branch does run
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        todo.extend(ast.iter_child_nodes(node))


def _known(name: str, modules: dict) -> str | None:
    """The module `name` refers to: itself, or the nearest enclosing module (a name inside a module)."""
    parts = name.split(".")
    while parts:
        if ".".join(parts) in modules:
            return ".".join(parts)
        parts.pop()
    return None


def imported_modules(module: str, path: Path, modules: dict) -> set[str]:
    """The package's modules that `module` imports, with relative and `from pkg import submodule` resolved."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in _import_nodes(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            if node.level:  # from . import x / from ..a import b: relative to the module's own package
                package = module.split(".") if is_package else module.split(".")[:-1]
                base_parts = package[:len(package) - (node.level - 1)]
                base = ".".join([*base_parts, *([node.module] if node.module else [])])
            else:
                base = node.module or ""
            # `from personalize.eval import metrics` imports the submodule metrics; `from x import name`, x
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        for target in targets:
            if target == PACKAGE or target.startswith(PACKAGE + "."):
                resolved = _known(target, modules)
                if resolved is not None and resolved != module:
                    found.add(resolved)
    return found


def import_graph(package_dir: Path = PACKAGE_DIR) -> dict[str, set[str]]:
    modules = module_files(package_dir)
    return {name: imported_modules(name, path, modules) for name, path in modules.items()}


def _strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's components with more than one module (a module importing itself is skipped above)."""
    index, low, on_stack, stack, components = {}, {}, set(), [], []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in sorted(graph.get(node, ())):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def _shortest_cycle_through(graph: dict[str, set[str]], start: str, within: set[str]) -> list[str]:
    """start -> ... -> start, shortest, inside one component (breadth first, so always found there)."""
    parent = {start: None}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        for succ in sorted(graph[node] & within):
            if succ == start:
                path = [node]
                while parent[path[-1]] is not None:
                    path.append(parent[path[-1]])
                return [*reversed(path), start]
            if succ not in parent:
                parent[succ] = node
                queue.append(succ)
    raise AssertionError(f"{start} is in a component but on no cycle")


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One shortest cycle through each module that is on a cycle, each cycle listed once (a -> b -> a)."""
    cycles = {}
    for component in _strongly_connected(graph):
        for module in component:
            cycle = _shortest_cycle_through(graph, module, set(component))[:-1]
            first = cycle.index(min(cycle))  # the same cycle found from another of its modules: same key
            key = tuple(cycle[first:] + cycle[:first])
            cycles[key] = [*key, key[0]]
    return sorted(cycles.values())


def test_the_graph_reader_resolves_every_import_form(tmp_path):
    """A small package with each form of import, and cycles hidden in functions and relative imports."""
    pkg = tmp_path / PACKAGE
    (pkg / "sub").mkdir(parents=True)
    files = {
        "__init__.py": "",
        "a.py": "import personalize.b\n",
        "b.py": "def f():\n    from personalize import a  # lazy, still an edge\n",
        "c.py": "from .sub import d\nfrom typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from personalize import e\n",
        "e.py": "from personalize.c import something\n",
        "sub/__init__.py": "from .. import c\n",
        "sub/d.py": "from ..c import name\nfrom . import x_not_a_module\nimport os\n",
    }
    for name, text in files.items():
        (pkg / name).write_text(text)
    graph = import_graph(pkg)
    assert graph == {
        PACKAGE: set(), f"{PACKAGE}.a": {f"{PACKAGE}.b"}, f"{PACKAGE}.b": {f"{PACKAGE}.a"},
        f"{PACKAGE}.c": {f"{PACKAGE}.sub.d"}, f"{PACKAGE}.e": {f"{PACKAGE}.c"},
        f"{PACKAGE}.sub": {f"{PACKAGE}.c"}, f"{PACKAGE}.sub.d": {f"{PACKAGE}.c", f"{PACKAGE}.sub"},
    }
    p = PACKAGE
    assert import_cycles(graph) == [[f"{p}.a", f"{p}.b", f"{p}.a"], [f"{p}.c", f"{p}.sub.d", f"{p}.c"],
                                    [f"{p}.c", f"{p}.sub.d", f"{p}.sub", f"{p}.c"]]


def test_the_package_has_no_import_cycle():
    graph = import_graph()
    assert len(graph) > 20 and graph[f"{PACKAGE}.train"]  # it read the real package
    cycles = import_cycles(graph)
    assert not cycles, "import cycles in the package:\n" + "\n".join(" -> ".join(c) for c in cycles)


@pytest.mark.parametrize("module", [PACKAGE, f"{PACKAGE}.schema", f"{PACKAGE}.cli"])
def test_light_entry_points_do_not_import_torch(module):
    """`personalize --help` and the config check run before anything heavy: no torch, no diffusers."""
    code = f"import sys, {module}; print(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_help_and_the_config_check_load_no_torch():
    """`personalize --help` and the one-line error of a bad option answer in a fraction of a second: no torch,
    lightning, diffusers or transformers (seconds to import), even though both compose the whole config."""
    code = ("import sys\nfrom personalize.cli import train_main\n"
            "for argv in (['--help'], ['method=no_such_method']):\n"
            "    sys.argv = ['personalize', *argv]\n"
            "    try:\n        train_main()\n    except SystemExit as stop:\n        print('exit', stop.code)\n"
            "print(sorted(m for m in ('torch', 'lightning', 'diffusers', 'transformers') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    lines = result.stdout.strip().splitlines()
    assert result.returncode == 0 and "unknown method 'no_such_method'" in result.stderr, result.stderr
    assert [line for line in lines if line.startswith("exit")] == ["exit 0", "exit 2"]
    assert lines[-1] == "[]"


def redefinitions(path: Path) -> list[str]:
    """Functions and classes defined twice in one scope of a module: the later silently replaces the earlier
    (a bad merge that appends an old copy below the new one leaves the old one in force)."""
    found = []

    def scan(body, scope):
        seen = {}
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                if node.name in seen and not node.decorator_list:  # @overload / @x.setter redefine on purpose
                    found.append(f"{path.name}:{node.lineno} {scope}{node.name} (first at line {seen[node.name]})")
                seen.setdefault(node.name, node.lineno)
                if isinstance(node, ast.ClassDef):
                    scan(node.body, f"{scope}{node.name}.")

    scan(ast.parse(path.read_text(), str(path)).body, "")
    return found


def test_the_reader_finds_a_function_defined_twice(tmp_path):
    path = tmp_path / "m.py"
    path.write_text("def f():\n    return 1\n\nclass C:\n    def g(self): ...\n    def g(self): ...\n\ndef f():\n    return 2\n"
                    "\nclass D:\n    @property\n    def p(self): ...\n    @p.setter\n    def p(self, v): ...\n")
    assert redefinitions(path) == ["m.py:6 C.g (first at line 5)", "m.py:8 f (first at line 1)"]


def test_no_module_defines_a_function_or_class_twice():
    found = [line for path in module_files().values() for line in redefinitions(path)]
    assert not found, "defined twice (the later copy wins):\n" + "\n".join(found)
