"""The architecture's budgets and layers, read from the source (issue 26): module and function sizes, parameter
counts, and what the inference pipeline loads when imported."""

import ast
import os
import subprocess
import sys

import pytest

SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src", "diffusionclip_pipeline")
MAX_MODULE_LINES, MAX_PIPELINE_LINES = 800, 900
MAX_FUNCTION_LINES, MAX_PIPELINE_CALL_LINES = 60, 80
MAX_PARAMETERS = 10
# the public entry points, which take keywords as diffusers' pipeline calls do (or a config object), and the
# pipeline's constructor, whose parameters are its components
MANY_PARAMETERS_ALLOWED = {
    ("pipeline_diffusionclip.py", "__init__"),
    ("pipeline_diffusionclip.py", "edit"),
    ("pipeline_diffusionclip.py", "__call__"),
    ("pipeline_diffusionclip.py", "invert"),
    ("pipeline_inputs.py", "check_inputs"),  # diffusers' check_inputs takes the call's arguments, as SDXL's does
    ("pipeline_translate.py", "translate"),
    ("pipeline_diffusionclip.py", "finetune"),
    ("training/trainer.py", "finetune"),
}


def source_files() -> list[str]:
    return sorted(
        os.path.relpath(os.path.join(folder, name), SRC)
        for folder, _, names in os.walk(SRC)
        for name in names
        if name.endswith(".py")
    )


def code_lines(node: ast.AST, lines: list[str]) -> int:
    """Lines of ``node``'s body that hold code: no blank lines, comments or the docstring."""
    body = node.body
    if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant):
        body = body[1:]  # the docstring
    if not body:
        return 0
    text = lines[body[0].lineno - 1 : body[-1].end_lineno]
    return sum(1 for line in text if line.strip() and not line.strip().startswith("#"))


def functions(path: str):
    text = open(os.path.join(SRC, path), encoding="utf-8").read()
    lines = text.splitlines()
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            args = node.args
            named = [*args.posonlyargs, *args.args, *args.kwonlyargs]
            count = len([a for a in named if a.arg not in ("self", "cls")])
            yield node.name, code_lines(node, lines), count


def test_the_budget_reader_counts_code_lines_and_parameters(tmp_path):
    text = 'def f(self, a, b=1, *args, c, **kw):\n    """Doc."""\n\n    # comment\n    x = 1\n    return x\n'
    node = ast.parse(text).body[0]
    assert code_lines(node, text.splitlines()) == 2
    assert len([*node.args.args, *node.args.kwonlyargs]) - 1 == 3


@pytest.mark.parametrize("path", source_files())
def test_module_sizes(path):
    limit = MAX_PIPELINE_LINES if path == "pipeline_diffusionclip.py" else MAX_MODULE_LINES
    with open(os.path.join(SRC, path), encoding="utf-8") as f:
        n = len(f.read().splitlines())
    assert n <= limit, f"{path} has {n} lines (budget {limit}): split it by concern"


@pytest.mark.parametrize("path", source_files())
def test_function_sizes_and_parameters(path):
    too_long, too_many = [], []
    for name, n, parameters in functions(path):
        limit = MAX_PIPELINE_CALL_LINES if (path, name) in MANY_PARAMETERS_ALLOWED else MAX_FUNCTION_LINES
        if n > limit:
            too_long.append(f"{name}: {n} code lines (budget {limit})")
        if parameters > MAX_PARAMETERS and (path, name) not in MANY_PARAMETERS_ALLOWED:
            too_many.append(f"{name}: {parameters} parameters (budget {MAX_PARAMETERS})")
    assert not too_long + too_many, f"{path}: " + "; ".join(too_long + too_many)


def test_importing_the_pipeline_loads_no_training_evaluation_or_commands():
    code = (
        "import sys, diffusionclip_pipeline.pipeline_diffusionclip\n"
        "print('\\n'.join(sorted(m for m in sys.modules if m.startswith('diffusionclip_pipeline'))))"
    )
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert "diffusionclip_pipeline.pipeline_diffusionclip" in loaded
    forbidden = ("training", "finetune", "checkpointing", "clip_loss", "evaluation", "commands", "cli", "app")
    offenders = [m for m in loaded if m.split(".")[1:2] and m.split(".")[1] in forbidden]
    assert not offenders, f"importing the pipeline loads {offenders}"
