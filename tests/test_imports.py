"""The package's import graph: acyclic (function-level imports included), and the library never imports the test-bed.

Read from the source with `ast`, nothing is imported. An edge ``a -> b`` means module ``a`` imports module ``b``
somewhere (``from . import name`` counts as importing the package ``__init__`` when ``name`` is not a module).
"""

import ast
import os

import pytest

SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")
PACKAGE = "diffusionclip_pipeline"
TESTBED = f"{PACKAGE}.testbed"


def package_modules() -> dict[str, str]:
    """Dotted module name -> file, for every ``.py`` under src/diffusionclip_pipeline."""
    modules = {}
    for folder, _, files in os.walk(os.path.join(SRC, PACKAGE)):
        for file in files:
            if file.endswith(".py"):
                parts = os.path.relpath(os.path.join(folder, file), SRC)[: -len(".py")].split(os.sep)
                modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = os.path.join(folder, file)
    return modules


def imported_modules(name: str, path: str, modules: dict[str, str]) -> set[str]:
    """The package modules that the module ``name`` imports, at any depth of its code."""
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    found = set()

    def add(target: str) -> None:  # the longest prefix of `target` that is a module of the package
        while target and target not in modules:
            target = target.rpartition(".")[0]
        if target:
            found.add(target)

    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read(), path)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            source = ".".join(p for p in (base, node.module) if p)
            for alias in node.names:
                add(f"{source}.{alias.name}" if f"{source}.{alias.name}" in modules else source)
        elif (  # importlib.import_module("diffusionclip_pipeline.x")
            isinstance(node, ast.Call)
            and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            add(node.args[0].value)
    found.discard(name)
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = package_modules()
    return {name: imported_modules(name, path, modules) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle ``[a, b, ..., a]`` of the graph, or None."""
    state, stack = {}, []  # state: 1 while on the DFS stack, 2 once done

    def visit(node):
        state[node] = 1
        stack.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                return stack[stack.index(target) :] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_graph_is_read():
    modules = package_modules()
    assert {PACKAGE, f"{PACKAGE}.cli", f"{PACKAGE}.image_io", TESTBED, f"{TESTBED}.cli_plugin"} <= set(modules)
    edges = imported_modules(f"{TESTBED}.cli_plugin", modules[f"{TESTBED}.cli_plugin"], modules)
    assert {f"{PACKAGE}.cli", f"{PACKAGE}.validation", f"{TESTBED}.demo", f"{TESTBED}.world"} <= edges
    # the cycle finder finds a cycle
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]


def test_no_import_cycle(graph):
    graph, cycles = {name: set(targets) for name, targets in graph.items()}, []
    while cycle := find_cycle(graph):  # each found cycle loses its last edge, so the next search finds another
        cycles.append(" -> ".join(cycle))
        graph[cycle[-2]].discard(cycle[-1])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_library_never_imports_the_testbed(graph):
    offenders = {
        name: sorted(t for t in targets if t == TESTBED or t.startswith(TESTBED + "."))
        for name, targets in graph.items()
        if not (name == TESTBED or name.startswith(TESTBED + "."))
    }
    assert not {name: targets for name, targets in offenders.items() if targets}


def test_image_io_is_neutral(graph):
    assert graph[f"{PACKAGE}.image_io"] <= {f"{PACKAGE}.utils", f"{PACKAGE}.utils.io"}
