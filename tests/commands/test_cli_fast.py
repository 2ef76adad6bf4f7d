"""The CLI's fine-tuning validation options and ``--fast`` (a registered model's fast presets)."""

import csv
import importlib.util

import PIL.Image
import pytest
from conftest import make_pipeline

from diffusionclip_pipeline.commands import register_model
from diffusionclip_pipeline.commands.main import main
from diffusionclip_pipeline.lora import read_adapter_file

PROMPTS = ["--src", "red circle", "--tar", "blue circle"]
TINY_FINETUNE = ["--t0", "50", "--num-inversion-steps", "2", "--num-train-steps", "1"]


@pytest.fixture
def toy(registry):
    """``--model toy``: recommended settings and fast presets that differ where the tests look; records its loads."""
    loads = []
    register_model(
        "toy", load=lambda: loads.append(1) or make_pipeline(),
        finetune_defaults=dict(t0=60, num_inversion_steps=2, num_train_steps=1, num_epochs=1),
        edit_defaults=dict(t0=50, num_inversion_steps=2, num_inference_steps=0),  # invalid: shows it is not used
        fast_finetune_defaults=lambda: dict(t0=40, num_inversion_steps=2, num_train_steps=1, num_epochs=1),
        fast_edit_defaults=dict(t0=50, encoding="noise", num_inference_steps=2),
    )  # fmt: skip
    register_model("plain", load=lambda: loads.append(1) or make_pipeline(), edit_defaults=dict(t0=50))
    return loads


def provenance(folder):
    return read_adapter_file(str(folder)).provenance


# ---- fine-tuning with validation ------------------------------------------------------------------------------


def test_finetune_validates_keeps_the_best_epoch_and_writes_its_table_and_grid(setup, capsys):
    out = setup / "ada"
    argv = ["finetune", "--model", str(setup / "pipe"), *PROMPTS, "--images", str(setup / "imgs"), "--output",
            str(out), *TINY_FINETUNE, "--num-epochs", "3", "--validation-images", str(setup / "imgs" / "img0.png"),
            str(setup / "imgs" / "img1.png"), "--validation-epochs", "2", "--keep-best", "mae"]  # fmt: skip
    assert main(argv) == 0
    with open(out / "validation.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["epoch"] for row in rows] == ["2", "3"]  # every 2nd epoch and the last
    assert list(rows[0]) == ["epoch", "s_dir", "mae", "ssim", "clip_score"]
    maes = [float(row["mae"]) for row in rows]
    best = (2, 3)[maes.index(min(maes))]
    recorded = provenance(out)
    assert recorded["best_epoch"] == best and recorded["keep_best"] == "mae"
    assert recorded["validation"]["epoch"] == best
    # the held-out images (2 columns), then one row per validated epoch
    assert PIL.Image.open(out / "validation.png").size == (2 * 18 + 2, 3 * 18 + 2)
    assert "## Validation" in (out / "README.md").read_text()  # the model card shows the kept epoch's scores
    stdout = capsys.readouterr().out
    assert "| epoch | s_dir | mae | ssim | clip_score |" in stdout
    assert f"kept the adapter of epoch {best} (the best by --keep-best mae)" in stdout


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--keep-best", "mae"], "--keep-best needs --validation-images"),
        (["--validation-epochs", "2"], "--validation-epochs needs --validation-images"),
        (["--validation-images", "{imgs}", "--keep-best-min-ssim", "0.5"], "--keep-best-min-ssim is a floor for"),
        (["--validation-images", "{tmp}/nowhere.png"], "--validation-images: no such image file or folder"),
        (["--report-to", "nope"], "--report-to nope: `report_to` must be one of"),
        (["--fast"], "--fast: --model plain registered no fast finetune preset (models with one: toy)"),
    ],
)
def test_finetune_option_errors_are_one_line_before_loading(setup, toy, capsys, argv, message):
    argv = [a.format(imgs=setup / "imgs", tmp=setup) for a in argv]
    assert main(["finetune", "--model", "plain", *PROMPTS, "--output", str(setup / "o"), *argv]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if ": error: " in line]
    assert len(errors) == 1 and message.format(tmp=setup) in errors[0] and "Traceback" not in err
    assert toy == [] and not (setup / "o").exists()  # nothing was loaded, nothing written


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--validation-epochs", "0"], "`--validation-epochs` must be a positive integer, got 0."),
        (["--keep-best-min-ssim", "2"], "`--keep-best-min-ssim` must be a finite number in [-1.0, 1.0], got 2.0."),
    ],
)
def test_finetune_option_values_stop_while_parsing(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["finetune", "--model", str(tmp_path), *PROMPTS, "--output", str(tmp_path / "o"), *argv])
    assert exit_info.value.code == 2 and capsys.readouterr().err == f"diffusionclip finetune: error: {message}\n"
    with pytest.raises(SystemExit) as exit_info:
        main(["finetune", "--model", str(tmp_path), *PROMPTS, "--output", "o", "--keep-best", "loss"])
    assert exit_info.value.code == 2 and "--keep-best: invalid choice: 'loss'" in capsys.readouterr().err


def test_keep_best_s_dir_2_on_a_model_with_one_clip_is_one_line(setup, capsys):
    argv = ["finetune", "--model", str(setup / "pipe"), *PROMPTS, "--images", str(setup / "imgs"), "--output",
            str(setup / "o"), *TINY_FINETUNE, "--validation-images", str(setup / "imgs"), "--keep-best",
            "s_dir_2"]  # fmt: skip
    assert main(argv) == 2
    assert "`keep_best`='s_dir_2' needs a second CLIP" in capsys.readouterr().err
    assert not (setup / "o" / "pytorch_lora_weights.safetensors").exists()


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is not None, reason="tensorboard is installed")
def test_report_to_an_absent_tracker_is_one_line_before_loading(setup, toy, capsys):
    assert main(["finetune", "--model", "toy", *PROMPTS, "--output", str(setup / "o"), "--report-to",
                 "tensorboard"]) == 2  # fmt: skip
    assert "--report-to tensorboard: `report_to`='tensorboard' needs the 'tensorboard' package" in (
        capsys.readouterr().err
    )
    assert toy == []


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None, reason="tensorboard is not installed")
def test_report_to_tensorboard_logs_next_to_the_adapter(setup, capsys):
    argv = ["finetune", "--model", str(setup / "pipe"), *PROMPTS, "--images", str(setup / "imgs"), "--output",
            str(setup / "ada"), *TINY_FINETUNE, "--num-epochs", "1", "--validation-images", str(setup / "imgs"),
            "--report-to", "tensorboard"]  # fmt: skip
    assert main(argv) == 0
    logs = setup / "ada" / "logs" / "diffusionclip-finetune"
    assert any(f.name.startswith("events.out.tfevents") for f in logs.iterdir())
    assert f"tensorboard logs in {setup / 'ada' / 'logs'}" in capsys.readouterr().out


# ---- --fast ---------------------------------------------------------------------------------------------------


def test_finetune_fast_uses_the_fast_preset_and_options_still_win(setup, toy):
    common = ["finetune", "--model", "toy", *PROMPTS, "--images", str(setup / "imgs")]
    assert main([*common, "--output", str(setup / "a")]) == 0
    assert provenance(setup / "a")["t0"] == 60  # the recommended settings
    assert main([*common, "--output", str(setup / "b"), "--fast"]) == 0
    assert provenance(setup / "b")["t0"] == 40  # the fast preset instead
    assert main([*common, "--output", str(setup / "c"), "--fast", "--t0", "30"]) == 0
    assert provenance(setup / "c")["t0"] == 30  # an option given wins over the preset


def test_edit_fast_uses_the_fast_preset_seeded_by_seed(setup, toy, capsys):
    common = ["edit", "--model", "toy", "--images", str(setup / "imgs")]
    assert main([*common, "--output", str(setup / "o")]) == 2  # the recommended settings (invalid on purpose)
    assert "`num_inference_steps` must be a positive integer" in capsys.readouterr().err
    for name, seed in (("a", "0"), ("b", "0"), ("c", "1")):  # the preset's encoding="noise" is seeded by --seed
        assert main([*common, "--output", str(setup / name), "--fast", "--seed", seed]) == 0
    images = {name: PIL.Image.open(setup / name / "img0_edited.png").tobytes() for name in "abc"}
    assert images["a"] == images["b"] != images["c"]


def test_sweep_fast_uses_the_fast_edit_preset_but_sweeps_t0(setup, toy):
    argv = ["sweep", "--model", "toy", "--images", str(setup / "imgs"), *PROMPTS, "--t0", "20", "30",
            "--edit-strength", "1", "--output", str(setup / "s")]  # fmt: skip
    assert main(argv) == 2  # the recommended edit settings (num_inference_steps=0) ...
    assert main([*argv, "--fast"]) == 0  # ... or the fast preset, whose t0 is swept over
    with open(setup / "s" / "metrics.csv", newline="") as handle:
        assert [row["t0"] for row in csv.DictReader(handle)] == ["20", "30"]


@pytest.mark.parametrize("command", ["finetune", "edit", "sweep"])
def test_fast_on_a_folder_or_a_model_without_presets_is_one_line_before_loading(setup, toy, capsys, command):
    extra = {"finetune": PROMPTS, "edit": ["--images", str(setup / "imgs")],
             "sweep": ["--images", str(setup / "imgs"), *PROMPTS]}[command]  # fmt: skip
    kind = "finetune" if command == "finetune" else "edit"
    assert main([command, "--model", str(setup / "pipe"), *extra, "--output", str(setup / "o"), "--fast"]) == 2
    assert f"--fast uses the fast {kind} preset of a registered --model; {setup / 'pipe'} is a folder" in (
        capsys.readouterr().err
    )
    if command != "finetune":  # plain registered fast presets for nothing
        assert main([command, "--model", "plain", *extra, "--output", str(setup / "o"), "--fast"]) == 2
        assert "--model plain registered no fast edit preset (models with one: toy)" in capsys.readouterr().err
    assert toy == [] and not (setup / "o").exists()


def test_fast_presets_are_checked_and_listed_in_help(registry, capsys):
    with pytest.raises(TypeError, match="`fast_edit_defaults` must be a mapping, a callable returning one, or None"):
        register_model("bad", load=make_pipeline, fast_edit_defaults=["t0"])
    register_model("quick", load=make_pipeline, fast_finetune_defaults={"num_epochs": 1})
    with pytest.raises(SystemExit):
        main(["finetune", "--help"])
    assert "models with one: quick" in " ".join(capsys.readouterr().out.split())
    with pytest.raises(SystemExit):
        main(["edit", "--help"])
    assert "no registered model has one yet" in " ".join(capsys.readouterr().out.split())
