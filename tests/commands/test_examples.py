"""The example scripts run offline on the shipped test-bed (their real-model paths need the hub)."""

import os
import runpy

import pytest

from diffusionclip_pipeline.testbed import RECOMMENDED_FINETUNE

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository
EXAMPLES = os.path.join(ROOT, "examples")


@pytest.fixture
def one_epoch(monkeypatch):
    # wiring, not quality: the end-to-end quality test runs the full recommended settings
    monkeypatch.setitem(RECOMMENDED_FINETUNE, "num_epochs", 1)


def load(name):
    return runpy.run_path(os.path.join(EXAMPLES, name), run_name="example")


@pytest.mark.slow
def test_showcase_runs_on_testbed(tmp_path, one_epoch, capsys):
    assert load("showcase.py")["main"](["--edit", "smiling", "--testbed", "--output", str(tmp_path)]) == 0
    assert (tmp_path / "grid.png").is_file() and (tmp_path / "pytorch_lora_weights.safetensors").is_file()
    assert "edited 8 images" in capsys.readouterr().out


def test_showcase_real_model_needs_images(tmp_path):
    with pytest.raises(SystemExit, match="--images is needed"):
        load("showcase.py")["main"](["--edit", "gothic", "--output", str(tmp_path)])


@pytest.mark.slow
def test_evaluate_runs_on_testbed(one_epoch, capsys):
    results = load("evaluate.py")["main"](["--testbed"])
    assert set(results) == {
        "S_dir (edit)", "MAE (reconstruction)", "SSIM (reconstruction)", "MAE (edit vs input)", "SSIM (edit vs input)",
    }  # fmt: skip
    # the adapter changes the images more than the reconstruction does, and the reconstruction is close
    assert results["MAE (reconstruction)"] < results["MAE (edit vs input)"] < 1
    assert 1 >= results["SSIM (reconstruction)"] > results["SSIM (edit vs input)"]
    assert results["MAE (reconstruction)"] < 0.05 and -1 <= results["S_dir (edit)"] <= 1
    assert "| S_dir (edit) |" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["showcase.py", "evaluate.py", "finetune.py"])
def test_examples_take_threads(name, capsys):
    required = {"showcase.py": ["--edit", "smiling", "--output", "o"], "evaluate.py": [],
                "finetune.py": ["--model", "testbed", "--src", "a", "--tar", "b", "--output", "o"]}[name]  # fmt: skip
    parse_args = load(name)["parse_args"]
    assert parse_args([*required, "--threads", "1"]).threads == 1
    assert parse_args(required).threads is None  # OMP_NUM_THREADS, else 1 on the test-bed, else torch's default
    with pytest.raises(SystemExit) as exit_info:
        parse_args([*required, "--threads", "0"])
    assert exit_info.value.code == 2 and "`--threads` must be a positive integer, got 0." in capsys.readouterr().err
