"""Scoring a pipeline's edits (`evaluate_edit`, `score_edits`) and the sweep over edit strength x inversion depth
(`evaluation.sweep` and ``diffusionclip sweep``)."""

import csv
import math

import PIL.Image
import pytest
import torch
from conftest import make_pipeline, random_images

from diffusionclip_pipeline import CLIPDirectionalLoss, NoAdapterWarning
from diffusionclip_pipeline.commands.main import main
from diffusionclip_pipeline.evaluation import (
    clip_score,
    directional_clip_similarity,
    evaluate_edit,
    mean_absolute_error,
    score_edits,
    ssim,
    sweep,
)

PROMPTS = ("red circle", "blue circle")
PROMPTS_ARGS = ["--src", "red circle", "--tar", "blue circle"]
EDIT = dict(num_inversion_steps=2, num_inference_steps=2)
COLUMNS = ["t0", "edit_strength", "s_dir", "mae", "ssim", "clip_score"]


@pytest.fixture(scope="module")
def adapted():
    """A tiny pipeline with a (briefly) fine-tuned adapter, so that the edit strength matters."""
    pipe = make_pipeline()
    pipe.finetune(*PROMPTS, images=random_images(2), t0=50, num_inversion_steps=2, num_train_steps=2, num_epochs=1,
                  batch_size=2, learning_rate=5e-2)  # fmt: skip
    return pipe


class UNetCalls:
    """Counts the UNet's forward calls (a forward hook: the UNet itself runs as it is)."""

    def __init__(self, pipe):
        self.count = 0
        self.handle = pipe.unet.register_forward_hook(self.hook)

    def hook(self, module, args, output):
        self.count += 1


def test_evaluate_edit_of_an_unadapted_pipeline_equals_the_metrics_computed_directly():
    pipe, x = make_pipeline(), random_images(3, seed=3)
    with pytest.warns(NoAdapterWarning):  # no adapter: the edit is a reconstruction
        out = evaluate_edit(pipe, x, *PROMPTS, t0=50, **EDIT)
        direct = pipe.edit(x, t0=50, **EDIT, output_type="pt").images
    assert torch.equal(out.images, direct) and torch.equal(out.source, (x + 1) / 2)
    edited = direct * 2 - 1
    loss_fn = CLIPDirectionalLoss(pipe.clip_model, pipe.clip_tokenizer)
    assert out.scores == {
        "s_dir": directional_clip_similarity(loss_fn, x, edited, *PROMPTS),
        "mae": mean_absolute_error(edited, x),
        "ssim": ssim(edited, x),
        "clip_score": clip_score(loss_fn, edited, PROMPTS[1]),
    }


def test_clip_score_is_the_cosine_to_the_target_text():
    pipe, x = make_pipeline(), random_images(2)
    loss_fn = CLIPDirectionalLoss(pipe.clip_model, pipe.clip_tokenizer, templates=("{}",))
    image = loss_fn.encode_images(x)
    text = loss_fn.encode_texts(["blue circle"])[0]
    expected = torch.nn.functional.cosine_similarity(image, text[None], dim=-1).mean().item()
    assert clip_score(loss_fn, x, "blue circle") == pytest.approx(expected, abs=1e-6)
    with pytest.raises(ValueError, match="`clip_losses` must be a non-empty list"):
        score_edits([], x, x, *PROMPTS)


def test_sweep_table_grid_and_rows_equal_single_edits(adapted):
    x = random_images(3, seed=5)
    out = sweep(adapted, x, *PROMPTS, edit_strengths=(0.0, 1.0), t0s=(30, 50), batch_size=2, **EDIT)
    assert [(row["t0"], row["edit_strength"]) for row in out.table] == [(30, 0.0), (30, 1.0), (50, 0.0), (50, 1.0)]
    assert all(list(row) == COLUMNS and all(math.isfinite(row[k]) for k in COLUMNS[2:]) for row in out.table)
    # rows: the inputs, then one per setting; columns: the 3 images (16 px, 2 px padding)
    assert out.grid.size == (3 * 18 + 2, 5 * 18 + 2)
    assert len(out.images) == 4 and all(tuple(e.shape) == (3, 3, 16, 16) for e in out.images)
    # each row is the pipeline's own edit at that setting (one shared inversion per t0)
    for row, images in zip(out.table, out.images):
        direct = adapted.edit(x[:2], t0=row["t0"], edit_strength=row["edit_strength"], output_type="pt", **EDIT)
        assert torch.equal(images[:2], direct.images)
    assert not torch.equal(out.images[0], out.images[1])  # the strength changes the edit ...
    assert out.table[0]["mae"] != out.table[2]["mae"]  # ... and so does the depth


def test_sweep_takes_single_values_and_noise_encoding_is_the_same_at_every_depth(adapted):
    x = random_images(2, seed=5)
    generator = torch.Generator().manual_seed(3)
    out = sweep(adapted, x, *PROMPTS, edit_strengths=1.0, t0s=(40, 40), encoding="noise", generator=generator, **EDIT)
    assert len(out.table) == 2 and out.table[0] == out.table[1]  # the generator reset for every depth
    again = adapted.edit(x, t0=40, encoding="noise", generator=torch.Generator().manual_seed(3), output_type="pt",
                         **EDIT)  # fmt: skip
    assert torch.equal(out.images[0], again.images)


@pytest.mark.parametrize(
    "kw, error, match",
    [
        (dict(edit_strengths=()), ValueError, "`edit_strengths` must hold at least one value"),
        (dict(edit_strengths=(1.0, "a")), TypeError, "`edit_strengths[1]` must be a finite number"),
        (dict(edit_strengths=(float("nan"),)), ValueError, "`edit_strengths[0]` must be a finite number"),
        (dict(t0s=(0,)), ValueError, "`t0s[0]` must be an integer in [1, 999], got 0."),
        (dict(t0s=1000), ValueError, "`t0s` must be an integer in [1, 999], got 1000."),
        (dict(t0=300), TypeError, "['t0'] are set here"),
        (dict(output_type="np"), TypeError, "['output_type'] are set here"),
        (dict(sharpness=2), TypeError, "Unknown `edit` argument(s) ['sharpness']"),
        (dict(num_inference_steps=0), ValueError, "`num_inference_steps` must be a positive integer, got 0."),
        (dict(batch_size=0), ValueError, "`batch_size` must be a positive integer, got 0."),
        (dict(prompt_src=""), ValueError, "`prompt_src` must be a non-empty string"),
        (dict(images=[]), ValueError, "`images` must not be an empty list"),
    ],
)
def test_bad_sweep_arguments_fail_before_any_unet_call(kw, error, match):
    pipe = make_pipeline()
    calls = UNetCalls(pipe)
    args = {"images": random_images(2), "prompt_src": PROMPTS[0], "prompt_tar": PROMPTS[1], **EDIT}
    args.update(kw)
    escaped = match.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[").replace("]", r"\]")
    with pytest.raises(error, match=escaped):
        sweep(pipe, **args)
    assert calls.count == 0


def test_cli_sweep_writes_grid_and_metrics(setup, capsys):
    model = str(setup / "pipe")
    assert main(["finetune", "--model", model, *PROMPTS_ARGS, "--images", str(setup / "imgs"), "--output",
                 str(setup / "ada"), "--t0", "50", "--num-inversion-steps", "2", "--num-train-steps", "1",
                 "--num-epochs", "1"]) == 0  # fmt: skip
    capsys.readouterr()
    argv = ["sweep", "--model", model, "--lora", str(setup / "ada"), "--images", str(setup / "imgs"), *PROMPTS_ARGS,
            "--t0", "30", "50", "--edit-strength", "0.5", "1", "1.5", "--num-inversion-steps", "2",
            "--num-inference-steps", "2", "--batch-size", "2", "--output", str(setup / "sweep")]  # fmt: skip
    assert main(argv) == 0
    with open(setup / "sweep" / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["t0"], r["edit_strength"]) for r in rows] == [
        (t0, r) for t0 in ("30", "50") for r in ("0.5", "1.0", "1.5")
    ]  # fmt: skip
    assert list(rows[0]) == COLUMNS and all(math.isfinite(float(r[k])) for r in rows for k in COLUMNS[2:])
    # rows: the 3 inputs as the model sees them, then one per setting
    assert PIL.Image.open(setup / "sweep" / "grid.png").size == (3 * 18 + 2, 7 * 18 + 2)
    out = capsys.readouterr().out
    assert "| t0 | edit_strength | s_dir | mae | ssim | clip_score |" in out and "| 50 | 1.5 |" in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--t0", "0"], "`--t0` must be a positive integer, got 0."),
        (["--edit-strength", "1", "nan"], "`--edit-strength` must be a finite number, got nan."),
        (["--batch-size", "0"], "`--batch-size` must be a positive integer, got 0."),
    ],
)
def test_cli_sweep_bad_option_values_stop_while_parsing(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["sweep", "--model", str(tmp_path / "none"), "--images", str(tmp_path), *PROMPTS_ARGS, "--output",
              str(tmp_path / "o"), *argv])  # fmt: skip
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == f"diffusionclip sweep: error: {message}\n"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--images", "{tmp}/nowhere.png"], "no such image file or folder"),
        (["--lora", "{tmp}/none"], "--lora {tmp}/none: no such adapter file or folder"),
        (["--fast"], "--fast uses the fast edit preset of a registered --model; {tmp}/pipe is a folder or hub id"),
        (["--t0", "1000"], "--t0 must be an integer in [1, 999] for --model"),  # the folder's range, before loading
    ],
)
def test_cli_sweep_errors_are_one_line(setup, capsys, argv, message):
    argv = [a.format(tmp=setup) for a in argv]
    images = [] if "--images" in argv else ["--images", str(setup / "imgs")]
    assert main(["sweep", "--model", str(setup / "pipe"), *images, *PROMPTS_ARGS, "--output", str(setup / "o"),
                 *argv]) == 2  # fmt: skip
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if ": error: " in line]
    assert len(errors) == 1 and message.format(tmp=setup) in errors[0] and "Traceback" not in err
    assert not (setup / "o").exists()
