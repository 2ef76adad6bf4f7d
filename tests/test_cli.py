import json
import os

import PIL.Image
import pytest
from conftest import make_clip, make_pipeline, make_tokenizer, random_images

from diffusionclip_pipeline.cli import image_grid, main
from diffusionclip_pipeline.image_processing import postprocess_image
from diffusionclip_pipeline.lora import read_adapter_file

FAST = ["--t0", "50", "--num-inversion-steps", "2"]


@pytest.fixture
def setup(tmp_path):
    make_pipeline().save_pretrained(tmp_path / "pipe")
    (tmp_path / "imgs").mkdir()
    for i, image in enumerate(postprocess_image(random_images(3))):
        image.save(tmp_path / "imgs" / f"img{i}.png")
    return tmp_path


def test_finetune_then_edit_with_adapter(setup, capsys):
    model = str(setup / "pipe")
    assert main(["finetune", "--model", model, "--src", "red circle", "--tar", "blue circle", "--images",
                 str(setup / "imgs"), "--output", str(setup / "ada"), *FAST, "--num-train-steps", "1",
                 "--num-epochs", "1"]) == 0  # fmt: skip
    assert (setup / "ada" / "pytorch_lora_weights.safetensors").is_file()
    argv = ["edit", "--model", model, "--images", str(setup / "imgs"), "--lora", str(setup / "ada"),
            "--output", str(setup / "out"), *FAST, "--num-inference-steps", "2", "--strength", "0.5",
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
    argv = ["finetune", "--model", str(setup / "pipe"), "--src", "red circle", "--tar", "blue circle", "--images",
            str(setup / "imgs"), "--output", str(setup / "ada"), *FAST, "--num-train-steps", "1", "--num-epochs", "1"]
    assert main([*argv, "--clip-2", str(setup / "clip2")]) == 0  # fmt: skip
    provenance = read_adapter_file(str(setup / "ada"))[1]["provenance"]
    assert '"num_clip_models": 2' in provenance
    assert main([*argv, "--lora-rank", "2"]) == 0  # alpha follows the rank: the scale stays 1
    lora_config = json.loads(read_adapter_file(str(setup / "ada"))[1]["lora_config"])
    assert (lora_config["rank"], lora_config["alpha"]) == (2, 2.0)
    assert main([*argv, "--clip-2", str(setup / "nowhere")]) == 2
    assert "cannot load --clip-2" in capsys.readouterr().err


def test_translate_writes_three_row_grid(setup):
    assert main(["translate", "--model", str(setup / "pipe"), "--images", str(setup / "imgs" / "img0.png"),
                 "--output", str(setup / "tr"), "--t0", "50", "--n-iter", "1"]) == 0  # fmt: skip
    assert PIL.Image.open(setup / "tr" / "grid.png").size == (18 + 2, 3 * 18 + 2)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["edit", "--images", "nowhere.png", "--output", "o"], "no such image file or folder: nowhere.png"),
        (["edit", "--images", "{imgs}", "--output", "{tmp}/o", "--t0", "0"], "`t0` must be an integer"),
        (["edit", "--images", "{imgs}", "--output", "{tmp}/o", "--lora", "{tmp}/none"], "No LoRA weights"),
        (["edit", "--images", "{imgs}", "--output", "{tmp}/o", "--num-fixed-point-iterations", "-1"],
         "`num_fixed_point_iterations` must be"),
    ],
)
def test_bad_arguments_give_one_line(setup, capsys, argv, message):
    argv = [a.format(imgs=setup / "imgs", tmp=setup) for a in argv]
    assert main([argv[0], "--model", str(setup / "pipe"), *argv[1:]]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("diffusionclip")]
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in err


def test_help_and_usage_errors(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    assert "finetune,edit,translate,demo" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        main(["sharpen"])
    assert exit_info.value.code == 2


def test_image_grid_validation():
    with pytest.raises(ValueError, match="`rows`"):
        image_grid([])
