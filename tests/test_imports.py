"""The package's import graph: acyclic (function-level imports included), strictly layered (each module imports only
its own layer or those below), and the library never imports the test-bed.

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
    assert {PACKAGE, f"{PACKAGE}.pipeline_diffusionclip", f"{PACKAGE}.image_io", TESTBED} <= set(modules)
    edges = imported_modules(
        f"{PACKAGE}.pipeline_diffusionclip", modules[f"{PACKAGE}.pipeline_diffusionclip"], modules
    )
    assert {f"{PACKAGE}.families", f"{PACKAGE}.utils.checks", f"{PACKAGE}.loaders"} <= edges
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


# The layers, lowest first (docs/design.md). A module is in the layer of the first prefix it matches; the deprecated
# shims sit in the layer of what they re-export.
LAYERS = [
    ("utilities", ("_version", "choices", "utils", "validation", "atomic")),
    (
        "families",
        (
            "families",
            "scheduling_ddim_grid",
            "scheduling_flow_match_grid",
            "schedule",
            "components",
            "autoencoder",
            "unet",
        ),
    ),
    ("inference", ("pipeline_output", "noise_mixing", "mixing", "image_processing", "image_io")),
    ("adapters", ("loaders", "lora", "model_card")),
    (
        "pipeline",
        (
            "pipeline_diffusionclip",
            "pipeline_utils",
            "pipeline_conveniences",
            "pipeline_clip",
            "pipeline_translate",
            "pipeline_inputs",
        ),  # fmt: skip
    ),
    (
        "training and evaluation",
        ("training", "finetune", "clip_loss", "checkpointing", "templates", "evaluation", "batch"),
    ),
    ("commands", ("commands", "cli", "app")),
    ("test-bed", ("testbed",)),
]
# the one allowed upward edge: the pipeline's `finetune` method is a thin forwarder to training, imported when it runs
ALLOWED_UPWARD = {(f"{PACKAGE}.pipeline_diffusionclip", f"{PACKAGE}.training")}


def layer_of(module: str) -> int:
    if module == PACKAGE:
        return len(LAYERS)  # the package's lazy exports may name anything
    name = module[len(PACKAGE) + 1 :]
    for index, (_, prefixes) in enumerate(LAYERS):
        if any(name == p or name.startswith(p + ".") for p in prefixes):
            return index
    raise AssertionError(f"{module} is in no layer: add it to LAYERS (and to docs/design.md)")


def test_every_module_has_a_layer(graph):
    for module in graph:
        layer_of(module)


def test_layers_import_only_downwards(graph):
    upward = [
        f"{source} ({LAYERS[layer_of(source)][0]}) -> {target} ({LAYERS[layer_of(target)][0]})"
        for source, targets in graph.items()
        for target in targets
        if target != PACKAGE and layer_of(target) > layer_of(source) and (source, target) not in ALLOWED_UPWARD
    ]
    assert not upward, "imports against the layering:\n" + "\n".join(sorted(upward))


def test_only_the_testbed_plugin_imports_the_commands(graph):
    commands = {m for m in graph if layer_of(m) == 6}
    offenders = {
        name: sorted(targets & commands)
        for name, targets in graph.items()
        if name.startswith(TESTBED) and name != f"{TESTBED}.cli_plugin" and targets & commands
    }
    assert not offenders


def test_image_io_is_neutral(graph):
    assert graph[f"{PACKAGE}.image_io"] <= {f"{PACKAGE}.utils", f"{PACKAGE}.utils.io"}
