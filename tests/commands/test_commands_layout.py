"""The commands package's shape: the deprecated `cli` / `app` shims, one source for choices and defaults, the
"alpha = rank" rule in one function, and the layering (only the commands' modules and their shims import them)."""

import ast
import importlib
import os
import subprocess
import sys

import pytest
from conftest import make_pipeline

from diffusionclip_pipeline import DiffusionCLIPPipeline, FinetuneConfig
from diffusionclip_pipeline.choices import KEEP_BEST, SCHEMES
from diffusionclip_pipeline.commands import app, main, register_model, registered_models
from diffusionclip_pipeline.commands.defaults import edit_defaults, finetune_defaults, rank_settings
from diffusionclip_pipeline.lora import read_adapter_file

SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "src")
PACKAGE = os.path.join(SRC, "diffusionclip_pipeline")


def choices_of(command: str, dest: str) -> tuple:
    parser = main.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    return tuple(next(a for a in sub._actions if a.dest == dest).choices)


def test_choice_lists_are_the_librarys():
    assert choices_of("finetune", "scheme") == SCHEMES and "one_step" in SCHEMES
    assert choices_of("finetune", "keep_best") == KEEP_BEST


def test_finetune_with_the_one_step_scheme(setup):
    argv = ["finetune", "--model", str(setup / "pipe"), "--src", "red circle", "--tar", "blue circle", "--images",
            str(setup / "imgs"), "--output", str(setup / "ada"), "--t0", "50", "--num-inversion-steps", "2",
            "--num-epochs", "1", "--scheme", "one_step"]  # fmt: skip
    assert main.main(argv) == 0
    assert read_adapter_file(str(setup / "ada")).provenance["scheme"] == "one_step"


def test_the_front_ends_defaults_are_read_from_the_library():
    config = FinetuneConfig()
    assert finetune_defaults("num_epochs", "learning_rate", "lora_rank") == {
        "num_epochs": config.num_epochs, "learning_rate": config.learning_rate, "lora_rank": config.lora_rank,
    }  # fmt: skip
    import inspect

    parameters = inspect.signature(DiffusionCLIPPipeline.edit).parameters
    assert edit_defaults("t0", "num_inference_steps") == {
        "t0": parameters["t0"].default, "num_inference_steps": parameters["num_inference_steps"].default,
    }  # fmt: skip
    state = app.AppState(make_pipeline(), model="some/model")  # no registered settings: the library's
    assert state.edit_settings() == edit_defaults("t0", "num_inversion_steps", "num_inference_steps")


def test_alpha_follows_the_rank():
    assert rank_settings(8) == {"lora_rank": 8, "lora_alpha": 8.0}
    config = FinetuneConfig()
    assert config.lora_alpha / config.lora_rank == 1  # the library's default scale, which the rule keeps


def test_registered_models_is_a_read_only_view(registry):
    register_model("toy", load=make_pipeline)
    models = registered_models()
    assert list(models) == ["toy"]
    with pytest.raises(TypeError):
        models["other"] = models["toy"]


def test_cli_shim_warns_and_reexports(registry, monkeypatch):
    monkeypatch.delitem(sys.modules, "diffusionclip_pipeline.cli", raising=False)  # imported afresh here
    with pytest.warns(FutureWarning, match="moved to `diffusionclip_pipeline.commands`"):
        cli = importlib.import_module("diffusionclip_pipeline.cli")
    for name in cli.__all__:
        assert getattr(cli, name) is not None, name
    assert cli.main is main.main and cli.PLUGIN_GROUP == "diffusionclip_pipeline.plugins"
    # a third-party plugin registering through the old path lands in the one registry
    cli.register_model("old-style", load=make_pipeline)
    assert "old-style" in registered_models()


def test_app_shim_warns_and_reexports(monkeypatch):
    monkeypatch.delitem(sys.modules, "diffusionclip_pipeline.app", raising=False)
    with pytest.warns(FutureWarning, match="moved to `diffusionclip_pipeline.commands.app`"):
        old_app = importlib.import_module("diffusionclip_pipeline.app")
    assert old_app.AppState is app.AppState and old_app.run is app.run


@pytest.mark.parametrize("module", ["diffusionclip_pipeline.cli", "diffusionclip_pipeline.commands.main"])
def test_python_m_runs_without_a_warning(module):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-W", "default", "-m", module, "--help"], capture_output=True, text=True,
                          env=env, timeout=120)  # fmt: skip
    assert done.returncode == 0 and done.stderr == "", done.stderr
    assert "{finetune,edit,translate,sweep," in done.stdout


def imported_modules(path: str) -> set[str]:
    """The ``diffusionclip_pipeline`` modules a file imports (absolute names), at any depth of its code."""
    name = os.path.relpath(path, SRC)[: -len(".py")].replace(os.sep, ".")
    package = name.rpartition(".")[0] if not name.endswith("__init__") else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
        if isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            source = ".".join(p for p in (base, node.module) if p)
            found |= {source, *(f"{source}.{alias.name}" for alias in node.names)}
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
    return found


def test_library_code_never_imports_the_commands():
    allowed = {"cli.py", "app.py", os.path.join("testbed", "cli_plugin.py")}  # the shims, the test-bed's plugin
    offenders = []
    for folder, _, files in os.walk(PACKAGE):
        for file in files:
            path = os.path.join(folder, file)
            relative = os.path.relpath(path, PACKAGE)
            if not file.endswith(".py") or relative.startswith("commands" + os.sep) or relative in allowed:
                continue
            if any(m.startswith("diffusionclip_pipeline.commands") for m in imported_modules(path)):
                offenders.append(relative)
    assert not offenders


def test_importing_the_commands_imports_nothing_heavy():
    code = (
        "import sys, warnings\n"
        "warnings.simplefilter('error')\n"
        "import diffusionclip_pipeline.commands.main\n"
        "print(sorted(m for m in ('torch', 'diffusers', 'transformers', 'numpy') if m in sys.modules))\n"
        "diffusionclip_pipeline.commands.main.build_parser()  # the installed plugins too: no deprecated import\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[0] == "[]"
