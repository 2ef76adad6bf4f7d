"""The CLI as a new user meets it: threads, training images from the test-bed world, progress bars, the output size
said up front, checks before any work, one-line warnings, offline hub errors, help texts and a quick ``--help``."""

import os
import subprocess
import sys
import warnings

import numpy as np
import PIL.Image
import pytest
import torch

from diffusionclip_pipeline import DiffusionCLIPPipeline
from diffusionclip_pipeline.commands import loading, register_command, registered_commands, registered_models
from diffusionclip_pipeline.commands.loading import set_num_threads
from diffusionclip_pipeline.commands.main import build_parser, main
from diffusionclip_pipeline.image_processing import postprocess_image, preprocess_image
from diffusionclip_pipeline.testbed import world
from diffusionclip_pipeline.testbed.cli_plugin import parse_prompt, render_training_images
from diffusionclip_pipeline.utils.logging import quiet_loading

FAST_EDIT = ["--t0", "50", "--num-inversion-steps", "2", "--num-inference-steps", "2"]
FAST_FINETUNE = ["--t0", "50", "--num-inversion-steps", "2", "--num-train-steps", "1", "--num-epochs", "1"]


@pytest.fixture
def threads():
    """Restores torch's thread count after the test."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def on_a_terminal(monkeypatch):
    """tqdm draws bars only on a terminal: make the captured stderr look like one (called in the test: capsys's
    stream is only in place while the test runs)."""
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)


def notes(err: str, command: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith(f"diffusionclip {command}: ")]


def edit_argv(setup, *extra):
    return ["edit", "--model", str(setup / "pipe"), "--images", str(setup / "imgs"), "--output", str(setup / "out"),
            *FAST_EDIT, *extra]  # fmt: skip


def finetune_argv(setup, *extra, model=None, output="ada"):
    return ["finetune", "--model", model or str(setup / "pipe"), "--src", "red circle", "--tar", "blue circle",
            "--output", str(setup / output), *FAST_FINETUNE, *extra]  # fmt: skip


# ---- 1. --threads ---------------------------------------------------------------------------------------------


def test_threads_option_env_and_recommendation(registry, monkeypatch, capsys, threads):
    register_command("threads", help="print torch's threads", add_arguments=lambda p: None,
                     run=lambda args: print(torch.get_num_threads()), num_threads=1)  # fmt: skip
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert main(["threads", "--threads", "2"]) == 0 and capsys.readouterr().out == "2\n"
    assert main(["threads"]) == 0 and capsys.readouterr().out == "1\n"  # the command's recommendation
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert main(["threads"]) == 0 and capsys.readouterr().out == "3\n"  # OMP_NUM_THREADS over the recommendation
    assert main(["threads", "--threads", "2"]) == 0 and capsys.readouterr().out == "2\n"  # --threads over both
    monkeypatch.setenv("OMP_NUM_THREADS", "many")
    assert main(["threads"]) == 2
    assert "OMP_NUM_THREADS='many' is not a positive integer" in capsys.readouterr().err
    monkeypatch.delenv("OMP_NUM_THREADS")
    torch.set_num_threads(2)
    assert set_num_threads() == 2  # nothing given, nothing recommended: torch's own setting stays
    with pytest.raises(SystemExit):
        main(["threads", "--threads", "0"])
    assert "`--threads` must be a positive integer, got 0." in capsys.readouterr().err


def test_every_command_has_threads_and_quiet():
    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.dest == "command").choices
    for name, sub in subparsers.items():
        assert {"--threads", "--quiet"} <= set(sub._option_string_actions), name
    # the test-bed's tiny models run fastest on one thread
    assert registered_models()["testbed"].num_threads == 1 and registered_commands()["demo"].num_threads == 1


# ---- 2. training images from the test-bed world ----------------------------------------------------------------


def test_testbed_renders_the_prompts_colour_and_shape():
    assert parse_prompt("a photo of a Red circle") == ("red", "circle")
    images = render_training_images("a green triangle", 4, seed=0)
    assert len(images) == 4 and images[0].size == (32, 32)
    assert {world.dominant_colour(im) for im in images} == {"green"}
    assert {world.classify_shape(im)[0] for im in images} == {"triangle"}
    with pytest.raises(ValueError, match="'a face' names no colour .* and no shape .* of the test-bed world"):
        parse_prompt("a face")
    with pytest.raises(ValueError, match="several colours \\(blue, red\\)"):
        parse_prompt("red or blue square")


def test_finetune_on_testbed_renders_from_src(tmp_path, capsys, threads):
    argv = finetune_argv(tmp_path, "--num-images", "2", model="testbed")
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert notes(captured.err, "finetune")[0] == (
        "diffusionclip finetune: no --images: rendering 2 training images of 'red circle' from --model testbed's "
        "world (seed 0; --images to use your own)"
    )
    assert (tmp_path / "ada" / "pytorch_lora_weights.safetensors").is_file() and "saved " in captured.out
    # an explicit --render, whatever --src says
    argv[argv.index("red circle")] = "a face"
    assert main([*argv, "--render", "blue square"]) == 0
    assert "rendering 2 training images of 'blue square' (--render, seed 0)" in capsys.readouterr().err
    # a prompt naming nothing of the world: sampling, and it says so
    assert main(argv) == 0
    assert (
        "no --images, and 'a face' names no colour (red, green, blue, yellow) and no shape (circle, square, "
        "triangle) of the test-bed world: sampling 2 training images from the model"
    ) in capsys.readouterr().err


def test_images_win_over_rendering(setup, capsys, threads):
    assert main(finetune_argv(setup, "--images", str(setup / "imgs"), model="testbed")) == 0
    err = capsys.readouterr().err
    assert "rendering" not in err and "sampling" not in err
    # 16 px inputs, a 32 px model: said up front
    assert (
        "the model works at 32x32: outputs are 32 px, inputs are centre-cropped and resized (3 of 3 input(s) "
        "differ, e.g. img0.png is 16x16)"
    ) in err


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--render", "red circle", "--images", "{imgs}"], "--render and --images both choose the training images"),
        (["--num-images", "3", "--images", "{imgs}"], "--num-images counts rendered or sampled images"),
        (
            ["--render", "red circle", "--model", "{pipe}"],
            "--render needs a --model that renders images (testbed, testbed-latent, testbed-flow)",
        ),
        (["--render", "a face"], "--render 'a face': 'a face' names no colour"),
    ],
)
def test_rendering_errors_come_before_loading(setup, capsys, monkeypatch, extra, message):
    monkeypatch.setattr(loading, "load_pipeline", lambda *a, **k: pytest.fail("loaded a model"))
    extra = [e.format(imgs=setup / "imgs", pipe=setup / "pipe") for e in extra]
    assert main(finetune_argv(setup, *extra, model="testbed")) == 2
    assert message in capsys.readouterr().err


# ---- 3. progress bars ---------------------------------------------------------------------------------------------


def test_quiet_loading_silences_the_loaders_bars():
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    assert diffusers_logging.is_progress_bar_enabled() and transformers_logging.is_progress_bar_enabled()
    with quiet_loading():
        assert not diffusers_logging.is_progress_bar_enabled()
        assert not transformers_logging.is_progress_bar_enabled()
    assert diffusers_logging.is_progress_bar_enabled() and transformers_logging.is_progress_bar_enabled()


def test_progress_bars_for_finetune_and_edit(setup, capsys, monkeypatch):
    on_a_terminal(monkeypatch)
    assert main(finetune_argv(setup, "--images", str(setup / "imgs"))) == 0
    err = capsys.readouterr().err
    assert "fine-tuning: " in err and "loss=" in err and "epoch=" in err  # tqdm also shows step/total and time left
    assert main(edit_argv(setup, "--lora", str(setup / "ada"))) == 0
    assert "editing images 1-3 of 3: " in capsys.readouterr().err
    assert main(edit_argv(setup, "--lora", str(setup / "ada"), "--quiet", "--overwrite")) == 0
    assert "editing images" not in capsys.readouterr().err


def test_testbed_loads_without_bars(tmp_path, capsys, monkeypatch, threads):
    on_a_terminal(monkeypatch)
    images, _ = world.render_dataset(1, seed=0, size=32)
    images[0].save(tmp_path / "x.png")
    argv = ["edit", "--model", "testbed", "--images", str(tmp_path / "x.png"), "--output", str(tmp_path / "out"),
            *FAST_EDIT]  # fmt: skip
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "Loading weights" not in err and "Loading pipeline components" not in err
    assert "reconstructing images 1-1 of 1: " in err


# ---- 4. the output size, and the grid's "before" row --------------------------------------------------------------


def test_output_size_is_said_and_the_grid_shows_what_the_model_saw(setup, capsys):
    rng = np.random.default_rng(0)
    for i in range(2):
        PIL.Image.fromarray(rng.integers(0, 256, (24, 40, 3), dtype=np.uint8)).save(setup / "imgs" / f"img{i}.png")
    assert main(edit_argv(setup)) == 0
    assert (
        "the model works at 16x16: outputs are 16 px, inputs are centre-cropped and resized (2 of 3 input(s) "
        "differ, e.g. img0.png is 40x24)"
    ) in capsys.readouterr().err
    grid = np.asarray(PIL.Image.open(setup / "out" / "grid.png"))
    seen = postprocess_image(preprocess_image(PIL.Image.open(setup / "imgs" / "img0.png").convert("RGB"), 16))[0]
    np.testing.assert_array_equal(grid[2:18, 2:18], np.asarray(seen))  # cropped and resized, not squashed


# ---- 5. checks before any work ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv, message",
    [
        (["finetune", "--src", "a", "--tar", "b", "--output", "/proc/forbidden"],
         "--output /proc/forbidden: not writable (cannot create files in /proc)"),
        (["finetune", "--src", "a", "--tar", "b", "--output", "{file}"], "exists and is not a folder"),
        (["edit", "--images", "{imgs}", "--output", "{tmp}/o", "--lora", "{tmp}/none"], "no such adapter file"),
        (["edit", "--images", "{imgs}", "--output", "{tmp}/o", "--lora", "{file}", "--lora-weights", "1", "2"],
         "--lora-weights has 2 values for 1 --lora adapters"),
        (["edit", "--images", "{tmp}/nowhere", "--output", "{tmp}/o"], "no such image file or folder"),
        (["translate", "--images", "{imgs}", "--output", "{file}"], "exists and is not a folder"),
        (["edit", "--images", "{imgs}", "--output", "{tmp}/o", "--device", "foo"], "unknown device 'foo'"),
    ],
)  # fmt: skip
def test_paths_and_options_are_checked_before_loading(setup, capsys, monkeypatch, argv, message):
    if "/proc/forbidden" in argv and not os.path.isdir("/proc"):
        pytest.skip("no /proc")
    (setup / "file").write_text("")
    monkeypatch.setattr(loading, "load_pipeline", lambda *a, **k: pytest.fail("loaded a model"))
    monkeypatch.setattr(DiffusionCLIPPipeline, "from_pretrained", lambda *a, **k: pytest.fail("loaded a model"))
    argv = [a.format(imgs=setup / "imgs", tmp=setup, file=setup / "file") for a in argv]
    assert main([argv[0], "--model", str(setup / "pipe"), *argv[1:]]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (setup / "o").exists()


# ---- 6. no-ops and library warnings -----------------------------------------------------------------------------


def test_edit_without_lora_says_it_reconstructs(setup, capsys):
    assert main(edit_argv(setup)) == 0
    captured = capsys.readouterr()
    assert "diffusionclip edit: no --lora given: writing reconstructions, not edits" in captured.err.splitlines()
    assert "No adapter is active" not in captured.err  # the library's warning, said once in the CLI's words
    assert captured.out.startswith("wrote 3 reconstructed images and grid.png")


def test_several_adapters_are_all_active_without_a_warning(setup, capsys):
    assert main(finetune_argv(setup, "--images", str(setup / "imgs"))) == 0
    assert main(finetune_argv(setup, "--images", str(setup / "imgs"), "--seed", "1", output="ada2")) == 0
    capsys.readouterr()
    argv = edit_argv(setup, "--lora", str(setup / "ada"), str(setup / "ada2"), "--lora-weights", "0.5", "0.5")
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "warning" not in captured.err and "only active" not in captured.err
    assert captured.out.startswith("wrote 3 edited images")


def test_library_warnings_are_one_line(registry, capsys):
    def run(args):
        warnings.warn("first line\n   second line", UserWarning, stacklevel=1)

    register_command("warn", help="", add_arguments=lambda p: None, run=run)
    assert main(["warn"]) == 0
    assert capsys.readouterr().err == "diffusionclip warn: warning: first line second line\n"


# ---- 7. an offline or unreachable hub ---------------------------------------------------------------------------


@pytest.fixture
def no_hub_loading(monkeypatch):
    monkeypatch.setattr(DiffusionCLIPPipeline, "from_pretrained", lambda *a, **k: pytest.fail("tried the hub"))
    monkeypatch.setattr(loading, "_in_hub_cache", lambda repo_id: False)


def test_offline_hub_id_fails_at_once(setup, capsys, monkeypatch, no_hub_loading):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    argv = ["edit", "--model", "owner/name", "--images", str(setup / "imgs"), "--output", str(setup / "o")]
    assert main(argv) == 2
    assert capsys.readouterr().err == (
        "diffusionclip edit: error: --model owner/name: the hub is offline (HF_HUB_OFFLINE is set) and owner/name is "
        "not in the local cache: pass a local folder instead (--model /path/to/folder), or unset HF_HUB_OFFLINE\n"
    )
    assert main([*finetune_argv(setup, "--images", str(setup / "imgs")), "--clip", "openai/clip"]) == 2
    assert "--clip openai/clip: the hub is offline" in capsys.readouterr().err


def test_unreachable_hub_fails_at_once(setup, capsys, monkeypatch, no_hub_loading):
    import huggingface_hub.constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(loading, "_hub_unreachable", lambda: "huggingface.co:443: Name or service not known")
    argv = ["edit", "--model", "owner/name", "--images", str(setup / "imgs"), "--output", str(setup / "o")]
    assert main(argv) == 2
    assert capsys.readouterr().err == (
        "diffusionclip edit: error: --model owner/name: the hub cannot be reached (huggingface.co:443: Name or "
        "service not known) and owner/name is not cached: pass a local folder instead (--model /path/to/folder)\n"
    )


def test_hub_load_error_is_one_line(setup, capsys, monkeypatch):
    import huggingface_hub.constants

    def fails(*args, **kwargs):  # diffusers' text when the hub cannot be reached
        raise OSError("Cannot load model owner/name: the model is not fully cached locally (...'local_files_only="
                      "False'...) and an error occurred while trying to fetch metadata from the Hub. Please check out "
                      "the root cause in the stacktrace above.")  # fmt: skip

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(loading, "_hub_unreachable", lambda: None)
    monkeypatch.setattr(DiffusionCLIPPipeline, "from_pretrained", fails)
    argv = ["edit", "--model", "owner/name", "--images", str(setup / "imgs"), "--output", str(setup / "o")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err == (
        "diffusionclip edit: error: --model owner/name: the hub could not be reached, and owner/name is not fully "
        "cached: pass a local folder instead (--model /path/to/folder)\n"
    )


# ---- 8. help texts, and a quick --help --------------------------------------------------------------------------


def test_every_option_has_help_and_the_real_defaults(capsys):
    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.dest == "command").choices
    for name in ("finetune", "edit", "translate", "demo"):
        for action in subparsers[name]._actions:
            assert action.help, f"{name} {action.option_strings} has no help"
    texts = {}
    for name in ("finetune", "edit", "translate", "demo"):
        with pytest.raises(SystemExit):
            main([name, "--help"])
        texts[name] = " ".join(capsys.readouterr().out.split())
    assert (
        "Passes over the training images (default: 10; --model testbed: 15; --model testbed-latent:"
        in texts["finetune"]
    )
    assert "Adam learning rate of the LoRA weights (default: 0.0005)" in texts["finetune"]
    assert "--seed SEED Seed of LoRA init, shuffling and sampled images" in texts["finetune"]
    assert "(default: 500; --model testbed: 400) --num-inversion-steps" in texts["edit"]  # testbed-flow: 500
    assert "images edited at once (default: 8)" in texts["edit"]
    assert "--seed SEED seed of the noise the rounds add (default: 0)" in texts["translate"]
    assert (
        "--n-iter N_ITER rounds of noising to --t0 and denoising with the original model (default: 10)"
        in (texts["translate"])
    )
    assert "--seed SEED data seed" in texts["demo"]


LIGHT_IMPORT = """
import importlib.util, sys, types
# diffusionclip_pipeline/__init__.py imports the pipeline; a bare package stands in for it, so that this measures
# what the CLI and the test-bed plugin import themselves
spec = importlib.util.find_spec("diffusionclip_pipeline")
package = types.ModuleType("diffusionclip_pipeline")
package.__path__ = list(spec.submodule_search_locations)
sys.modules["diffusionclip_pipeline"] = package
from diffusionclip_pipeline.commands import main
main.build_parser().format_help()  # every installed plugin included
for argv in (["--help"], ["demo", "--help"], ["edit"]):
    try:
        main.main(argv)
    except SystemExit:
        pass
print(sorted(m for m in ("torch", "diffusers", "transformers", "peft", "accelerate") if m in sys.modules))
"""


def test_help_and_usage_errors_import_nothing_heavy():
    result = subprocess.run([sys.executable, "-c", LIGHT_IMPORT], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "[]"
