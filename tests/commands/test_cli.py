import os
from importlib.metadata import EntryPoint, entry_points

import PIL.Image
import pytest
from conftest import make_clip, make_pipeline, make_tokenizer

from diffusionclip_pipeline.commands import (
    PLUGIN_GROUP,
    load_plugins,
    register_command,
    register_model,
    registered_commands,
    registered_models,
)
from diffusionclip_pipeline.commands import registry as registry_module
from diffusionclip_pipeline.commands.main import main
from diffusionclip_pipeline.image_io import image_grid
from diffusionclip_pipeline.lora import read_adapter_file

FAST = ["--t0", "50", "--num-inversion-steps", "2"]
FINETUNE = ["finetune", "--src", "a", "--tar", "b"]


def test_finetune_then_edit_with_adapter(setup, capsys):
    model = str(setup / "pipe")
    assert main(["finetune", "--model", model, "--src", "red circle", "--tar", "blue circle", "--images",
                 str(setup / "imgs"), "--output", str(setup / "ada"), *FAST, "--num-train-steps", "1",
                 "--num-epochs", "1"]) == 0  # fmt: skip
    assert (setup / "ada" / "pytorch_lora_weights.safetensors").is_file()
    argv = ["edit", "--model", model, "--images", str(setup / "imgs"), "--lora", str(setup / "ada"),
            "--output", str(setup / "out"), *FAST, "--num-inference-steps", "2", "--edit-strength", "0.5",
            "--num-fixed-point-iterations", "1"]  # fmt: skip
    assert main(argv) == 0
    files = sorted(os.listdir(setup / "out"))
    assert files == ["grid.png", "img0_edited.png", "img1_edited.png", "img2_edited.png"]
    assert PIL.Image.open(setup / "out" / "grid.png").size == (3 * 18 + 2, 2 * 18 + 2)
    assert "wrote 3 edited images" in capsys.readouterr().out


def test_finetune_with_a_second_clip(setup, capsys):
    tokenizer = make_tokenizer()
    make_clip(tokenizer, seed=1).save_pretrained(setup / "clip2")
    tokenizer.save_pretrained(setup / "clip2")
    argv = [
        "finetune",
        "--model",
        str(setup / "pipe"),
        "--src",
        "red circle",
        "--tar",
        "blue circle",
        "--images",
        str(setup / "imgs"),
        "--output",
        str(setup / "ada"),
        *FAST,
        "--num-train-steps",
        "1",
        "--num-epochs",
        "1",
    ]
    assert main([*argv, "--clip-2", str(setup / "clip2")]) == 0  # fmt: skip
    assert read_adapter_file(str(setup / "ada")).provenance["num_clip_models"] == 2
    assert main([*argv, "--lora-rank", "2"]) == 0  # alpha follows the rank: the scale stays 1
    settings = read_adapter_file(str(setup / "ada")).settings
    assert (settings.rank, settings.alpha) == (2, 2.0)
    assert main([*argv, "--clip-2", str(setup / "nowhere")]) == 2
    assert "--clip-2 " in (err := capsys.readouterr().err) and "nowhere: no such folder" in err


def test_translate_writes_three_row_grid(setup):
    assert main(["translate", "--model", str(setup / "pipe"), "--images", str(setup / "imgs" / "img0.png"),
                 "--output", str(setup / "tr"), "--t0", "50", "--n-iter", "1"]) == 0  # fmt: skip
    assert PIL.Image.open(setup / "tr" / "grid.png").size == (18 + 2, 3 * 18 + 2)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["edit", "--images", "nowhere.png", "--output", "o"], "no such image file or folder: nowhere.png"),
        # the model's own range (here [1, 999]) is checked by the pipeline, after loading
        (["edit", "--images", "{imgs}", "--output", "{tmp}/o", "--t0", "1000"], "--t0 must be an integer in [1, 999]"),
        (["edit", "--images", "{imgs}", "--output", "{tmp}/o", "--lora", "{tmp}/none"], "no such adapter file"),
        (
            [
                "edit",
                "--images",
                "{imgs}",
                "--output",
                "{tmp}/o",
                "--strength",
                "0.5",
                "--edit-strength",
                "0.5",
                "--lora",
                "{tmp}/none",
            ],
            "no such adapter file",
        ),  # fmt: skip
    ],
)
def test_bad_arguments_give_one_line(setup, capsys, argv, message):
    argv = [a.format(imgs=setup / "imgs", tmp=setup) for a in argv]
    assert main([argv[0], "--model", str(setup / "pipe"), *argv[1:]]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("diffusionclip") and ": error: " in line]
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["edit", "--batch-size", "0"], "`--batch-size` must be a positive integer, got 0."),
        (["edit", "--t0", "-5"], "`--t0` must be a positive integer, got -5."),
        (["edit", "--t0", "0"], "`--t0` must be a positive integer, got 0."),
        (
            ["edit", "--num-fixed-point-iterations", "-1"],
            "`--num-fixed-point-iterations` must be an integer >= 0, got -1.",
        ),
        (["edit", "--strength", "nan"], "`--strength` must be a finite number, got nan."),
        (["edit", "--lora-weights", "1", "inf"], "`--lora-weights` must be a finite number, got inf."),
        ([*FINETUNE, "--t0", "-1"], "`--t0` must be a positive integer, got -1."),
        ([*FINETUNE, "--learning-rate", "0"], "`--learning-rate` must be a finite number > 0.0, got 0.0."),
        ([*FINETUNE, "--num-epochs", "0"], "`--num-epochs` must be a positive integer, got 0."),
        ([*FINETUNE, "--seed", "-1"], "`--seed` must be an integer >= 0, got -1."),
        (["translate", "--n-iter", "0"], "`--n-iter` must be a positive integer, got 0."),
    ],
)
def test_bad_option_values_stop_before_loading(tmp_path, capsys, argv, message):
    # the model does not exist: the value is refused while parsing, before anything is loaded
    argv = [*argv, "--model", str(tmp_path / "no-model"), "--images", str(tmp_path), "--output", str(tmp_path / "o")]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == f"diffusionclip {argv[0]}: error: {message}\n"  # one line, no traceback
    assert not (tmp_path / "o").exists()


def test_demo_option_values_are_checked_while_parsing(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--num-test", "0"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "diffusionclip demo: error: `--num-test` must be a positive integer, got 0.\n"


def commands_listed(help_text: str) -> list[str]:
    """The sub-commands in ``diffusionclip --help``'s usage line, ``{finetune,edit,...}``."""
    return help_text.split("{", 1)[1].split("}", 1)[0].split(",")


def test_help_and_usage_errors(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    assert {"finetune", "edit", "translate", "demo"} <= set(commands_listed(capsys.readouterr().out))
    with pytest.raises(SystemExit) as exit_info:
        main(["sharpen"])
    assert exit_info.value.code == 2


def test_image_grid_validation():
    with pytest.raises(ValueError, match="`rows`"):
        image_grid([])


# ---- plugins ------------------------------------------------------------------------------------------------------


def test_testbed_is_an_installed_plugin():
    assert "diffusionclip_pipeline.testbed.cli_plugin:register" in {e.value for e in entry_points(group=PLUGIN_GROUP)}
    load_plugins()
    assert "testbed" in registered_models() and "demo" in registered_commands()


def test_without_plugins_other_models_work_and_testbed_is_unknown(setup, registry, capsys):
    # `registry` hides the installed entry points: as if the package's plugins were not installed
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "{finetune,edit,translate,sweep}" in capsys.readouterr().out
    argv = ["edit", "--images", str(setup / "imgs"), "--output", str(setup / "out"), *FAST,
            "--num-inference-steps", "2"]  # fmt: skip
    assert main([*argv, "--model", "testbed"]) == 2
    assert "unknown model 'testbed': not a registered model (registered: none" in capsys.readouterr().err
    assert main([*argv, "--model", str(setup / "pipe")]) == 0


def test_a_broken_plugin_is_reported_and_skipped(registry, monkeypatch, capsys):
    installed = list(entry_points(group=PLUGIN_GROUP))
    broken = EntryPoint(name="broken", value="diffusionclip_pipeline.no_such_module:register", group=PLUGIN_GROUP)
    monkeypatch.setattr(registry_module, "entry_points", lambda group: [broken, *installed])
    with pytest.raises(SystemExit):
        main(["--help"])
    captured = capsys.readouterr()
    assert "plugin 'broken' (diffusionclip_pipeline.no_such_module:register) not loaded" in captured.err
    assert {"finetune", "edit", "translate", "demo"} <= set(commands_listed(captured.out))


def test_registered_model_and_command(setup, registry, capsys):
    loaded = []
    edit_defaults = {"t0": 50, "num_inversion_steps": 2, "num_inference_steps": 0}
    register_model("toy", load=lambda: loaded.append(1) or make_pipeline(), edit_defaults=edit_defaults, help="a toy")
    register_command("hello", help="say hello", add_arguments=lambda p: p.add_argument("--name", default="you"),
                     run=lambda args: print(f"hello {args.name}"))  # fmt: skip
    assert main(["hello", "--name", "toy"]) == 0 and capsys.readouterr().out == "hello toy\n"
    argv = ["edit", "--model", "toy", "--images", str(setup / "imgs"), "--output", str(setup / "out")]
    assert main(argv) == 2  # the registered defaults reach the pipeline ...
    assert "`num_inference_steps` must be a positive integer" in capsys.readouterr().err
    assert main([*argv, "--num-inference-steps", "2"]) == 0  # ... and the options given win over them
    assert loaded == [1, 1] and (setup / "out" / "grid.png").is_file()
    assert main(["edit", "--model", "toy", "--clip", "x", "--images", str(setup / "imgs"), "--output", "o"]) == 2
    assert "--clip does not apply to --model toy" in capsys.readouterr().err
    with pytest.raises(ValueError, match="already"):
        register_model("toy", load=make_pipeline)
    with pytest.raises(ValueError, match="already exists"):
        register_command("edit", help="", add_arguments=lambda p: None, run=lambda a: None)
    with pytest.raises(ValueError, match="without '/'"):
        register_model("owner/name", load=make_pipeline)
