"""Validation during fine-tuning (held-out edits scored per epoch), best-epoch selection and the trackers."""

import importlib.util
import math
import os

import pytest
import torch
from conftest import make_clip, make_pipeline, make_tokenizer, random_images
from peft.utils import get_peft_model_state_dict

from diffusionclip_pipeline import CLIPDirectionalLoss
from diffusionclip_pipeline.evaluation import directional_clip_similarity, mean_absolute_error, ssim
from diffusionclip_pipeline.lora import adapter_names, get_provenance
from diffusionclip_pipeline.training import FinetuneConfig, finetune

PROMPTS = ("red circle", "blue circle")
# 2 training images in one batch; CLIP views on (the default), so the view generator matters for determinism
TINY = dict(t0=100, num_inversion_steps=3, num_train_steps=2, num_epochs=3, batch_size=2, learning_rate=1e-2)
SCORES = {"s_dir", "mae", "ssim", "clip_score"}


def run(pipe=None, **kw):
    pipe = pipe or make_pipeline()
    settings = {k: kw.pop(k) for k in list(kw) if k in TINY or hasattr(FinetuneConfig, k)}
    out = finetune(pipe, *PROMPTS, images=random_images(2), config=FinetuneConfig(**{**TINY, **settings}), **kw)
    return pipe, out


def adapter_state(pipe, name="default"):
    return {k: v.clone() for k, v in get_peft_model_state_dict(pipe.unet, adapter_name=name).items()}


def assert_identical(a, b):
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:3]


def held_out(n=2):
    return random_images(n, seed=7)


def test_validation_scores_every_kth_epoch_and_the_last():
    pipe, out = run(validation_images=held_out(3), validation_epochs=2)
    assert [entry["epoch"] for entry in out.validation] == [2, 3]  # every 2nd epoch, and the last
    for entry in out.validation:
        assert set(entry) == {"epoch"} | SCORES  # one CLIP: no s_dir_2
        assert all(math.isfinite(entry[k]) for k in SCORES)
        assert 0 <= entry["mae"] <= 1 and -1 <= entry["s_dir"] <= 1 and -1 <= entry["clip_score"] <= 1
    assert out.best_epoch is None  # no keep_best: the last epoch's weights
    # the grid: the held-out images as the model sees them, then one row per validated epoch; 3 columns
    assert out.validation_grid.size == (3 * 18 + 2, 3 * 18 + 2)
    # the kept epoch's scores are recorded with the adapter (its model card shows them)
    assert get_provenance(pipe.unet, "default")["validation"] == out.validation[-1]


def test_validation_scores_are_those_of_the_pipelines_own_edit():
    x_val = held_out(2)  # one batch: the validation edit is exactly one `edit` call
    pipe, out = run(validation_images=x_val, validation_epochs=3)
    # the run's t0, inversion steps and num_train_steps generation steps, with the final adapter
    edited = pipe.edit(x_val, t0=100, num_inversion_steps=3, num_inference_steps=2, output_type="pt").images * 2 - 1
    (entry,) = out.validation
    assert entry["mae"] == mean_absolute_error(edited, x_val)
    assert entry["ssim"] == ssim(edited, x_val)
    loss_fn = CLIPDirectionalLoss(pipe.clip_model, pipe.clip_tokenizer)
    assert entry["s_dir"] == directional_clip_similarity(loss_fn, x_val, edited, *PROMPTS)


def test_validation_does_not_change_training():
    plain_pipe, plain = run()
    validated_pipe, validated = run(validation_images=held_out(3), validation_epochs=1)
    assert len(validated.validation) == 3
    assert_identical(adapter_state(plain_pipe), adapter_state(validated_pipe))
    assert plain.loss_history == validated.loss_history
    assert plain.validation == [] and plain.best_epoch is None and plain.validation_grid is None


def test_keep_best_restores_the_best_epochs_weights_exactly():
    pipe, out = run(validation_images=held_out(2), keep_best="mae")
    maes = [entry["mae"] for entry in out.validation]
    assert out.best_epoch == 1 + maes.index(min(maes))  # mae: the smallest wins (the earliest on a tie)
    provenance = get_provenance(pipe.unet, "default")
    assert provenance["best_epoch"] == out.best_epoch and provenance["keep_best"] == "mae"
    assert provenance["validation"] == out.validation[out.best_epoch - 1]
    # the weights of that epoch: those of the same run stopped there (training never depends on later epochs)
    stopped, _ = run(num_epochs=out.best_epoch)
    assert_identical(adapter_state(pipe), adapter_state(stopped))
    if out.best_epoch < TINY["num_epochs"]:
        full, _ = run()
        assert any(not torch.equal(v, adapter_state(full)[k]) for k, v in adapter_state(pipe).items())


def test_keep_best_min_ssim_no_epoch_eligible_keeps_the_highest_ssim_with_a_warning():
    # a regeneration is never pixel-exact, so no epoch reaches an SSIM of 1
    with pytest.warns(UserWarning, match="No validated epoch reached `keep_best_min_ssim`=1.0"):
        _, out = run(num_epochs=2, validation_images=held_out(2), keep_best="s_dir", keep_best_min_ssim=1.0)
    ssims = [entry["ssim"] for entry in out.validation]
    assert out.best_epoch == 1 + ssims.index(max(ssims))


def test_second_clip_is_scored_separately_and_can_pick_the_epoch():
    tokenizer = make_tokenizer()
    pipe = make_pipeline()
    pipe.register_modules(clip_model_2=make_clip(tokenizer, seed=1), clip_tokenizer_2=tokenizer)
    _, out = run(pipe, num_epochs=2, validation_images=held_out(2), keep_best="s_dir_2")
    assert all(set(entry) == {"epoch", "s_dir_2"} | SCORES for entry in out.validation)
    assert all(entry["s_dir"] != entry["s_dir_2"] for entry in out.validation)  # two CLIPs, two spaces
    scores = [entry["s_dir_2"] for entry in out.validation]
    assert out.best_epoch == 1 + scores.index(max(scores))


def test_validation_on_a_latent_model():
    from conftest import make_ldm_components

    from diffusionclip_pipeline import DiffusionCLIPPipeline

    tokenizer = make_tokenizer()
    pipe = DiffusionCLIPPipeline(**make_ldm_components(), clip_model=make_clip(tokenizer), clip_tokenizer=tokenizer)
    pipe.set_progress_bar_config(disable=True)
    _, out = run(pipe, num_epochs=2, validation_images=held_out(2), keep_best="clip_score")
    assert [entry["epoch"] for entry in out.validation] == [1, 2]  # edited through the autoencoder, 16 px images
    assert all(math.isfinite(entry[k]) for entry in out.validation for k in SCORES)
    assert out.validation_grid.size == (2 * 18 + 2, 3 * 18 + 2) and out.best_epoch in (1, 2)


def tracker_missing() -> str | None:
    missing = [name for name in ("swanlab", "trackio", "dvclive") if importlib.util.find_spec(name) is None]
    return missing[0] if missing else None


@pytest.mark.parametrize(
    "kw, error, match",
    [
        (dict(validation_epochs=0), ValueError, "`validation_epochs` must be a positive integer, got 0."),
        (dict(validation_epochs=1.5), TypeError, "`validation_epochs` must be a positive integer"),
        (dict(keep_best="s_dir"), ValueError, "`keep_best`='s_dir' needs `validation_images`"),
        (dict(validation_images="VAL", keep_best="loss"), ValueError, "`keep_best` must be one of"),
        (dict(validation_images="VAL", keep_best=1), TypeError, "`keep_best` must be one of"),
        (dict(validation_images="VAL", keep_best="s_dir_2"), ValueError, "`keep_best`='s_dir_2' needs a second CLIP"),
        (dict(validation_images="VAL", keep_best="ssim", keep_best_min_ssim=1.5), ValueError, "`keep_best_min_ssim`"),
        (dict(validation_images="VAL", keep_best="ssim", keep_best_min_ssim="0.5"), TypeError, "`keep_best_min_ssim`"),
        (dict(validation_images="VAL", keep_best_min_ssim=0.5), ValueError, "floor for `keep_best`; pass `keep_best`"),
        (dict(validation_images=[]), ValueError, "`validation_images` must not be an empty list"),
        (dict(validation_images="a.png"), TypeError, "`validation_images` must be a PIL image"),
        (dict(validation_images="VAL", resume_from="TMP"), ValueError, "cannot be combined with `resume_from`"),
        (dict(report_to="nope"), ValueError, "`report_to` must be one of"),
        (dict(report_to=1), TypeError, "`report_to` must be one of"),
        (dict(report_to="tensorboard", accelerator="ACC"), ValueError, "with your own `accelerator`"),
        (dict(logging_dir="TMP"), ValueError, "is only used with `report_to`"),
        (dict(report_to="tensorboard", logging_dir=3), TypeError, "`logging_dir` must be a folder path"),
    ],
)
def test_bad_validation_arguments_fail_before_any_work(tmp_path, kw, error, match):
    from accelerate import Accelerator

    values = {"VAL": held_out(1), "TMP": tmp_path, "ACC": Accelerator(cpu=True)}
    kw = {k: values.get(v, v) if isinstance(v, str) else v for k, v in kw.items()}
    pipe = make_pipeline()
    with pytest.raises(error, match=match.replace("(", r"\(").replace("[", r"\[")):
        finetune(pipe, *PROMPTS, images=random_images(2), config=FinetuneConfig(**TINY), **kw)
    assert adapter_names(pipe.unet) == []


@pytest.mark.skipif(tracker_missing() is None, reason="every tracker package probed is installed")
def test_report_to_a_tracker_that_is_not_installed_fails_before_any_work():
    name = tracker_missing()
    pipe = make_pipeline()
    with pytest.raises(ImportError, match=f"`report_to`='{name}' needs the '{name}' package.*pip install {name}"):
        finetune(pipe, *PROMPTS, images=random_images(2), config=FinetuneConfig(**TINY), report_to=name)
    assert adapter_names(pipe.unet) == []


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None, reason="tensorboard is not installed")
def test_tensorboard_gets_the_loss_the_scores_and_the_grids(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with pytest.raises(ValueError, match="writes its logs to a folder: pass `logging_dir`"):
        finetune(make_pipeline(), *PROMPTS, images=random_images(2), report_to="tensorboard")
    _, out = run(num_epochs=2, validation_images=held_out(2), report_to="tensorboard", logging_dir=tmp_path / "logs")
    run_dir = tmp_path / "logs" / "diffusionclip-finetune"
    events = [f for f in os.listdir(run_dir) if f.startswith("events.out.tfevents")]
    assert events
    log = EventAccumulator(str(run_dir), size_guidance={"images": 0, "scalars": 0}).Reload()
    tags = log.Tags()
    assert {"train/loss", "validation/s_dir", "validation/mae", "validation/ssim", "validation/clip_score"} <= set(
        tags["scalars"]
    )
    assert [e.value for e in log.Scalars("validation/mae")] == pytest.approx([v["mae"] for v in out.validation])
    assert len(log.Scalars("train/loss")) == 2  # one batch per epoch
    grids = log.Images("validation/grid")
    assert len(grids) == 2 and (grids[0].width, grids[0].height) == (2 * 18 + 2, 2 * 18 + 2)  # before/after rows
