"""Early stopping (issue 34): it stops on a plateau of the validated score, keeps the best epoch, says why it stopped;
without held-out images it reads the training images' scores (the proxy); a run that learns nothing is flagged;
`callback_on_epoch_end` sees every epoch and can stop the run; every new argument is checked before any work."""

import math

import pytest
import torch
from conftest import make_pipeline, random_images
from peft.utils import get_peft_model_state_dict

from diffusionclip_pipeline import evaluation
from diffusionclip_pipeline.lora import get_provenance
from diffusionclip_pipeline.training import FinetuneConfig, finetune
from diffusionclip_pipeline.training.callbacks import FLAT_MIN_GAIN, EarlyStopping

PROMPTS = ("red circle", "blue circle")
TINY = dict(t0=100, num_inversion_steps=3, num_train_steps=2, num_epochs=6, batch_size=2, learning_rate=1e-2)


def run(pipe=None, images=None, **kw):
    pipe = pipe or make_pipeline()
    settings = {k: kw.pop(k) for k in list(kw) if hasattr(FinetuneConfig, k)}
    images = random_images(2) if images is None else images
    out = finetune(pipe, *PROMPTS, images=images, config=FinetuneConfig(**{**TINY, **settings}), **kw)
    return pipe, out


def adapter_state(pipe):
    return {k: v.clone() for k, v in get_peft_model_state_dict(pipe.unet, adapter_name="default").items()}


def assert_identical(a, b):
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture
def scripted_s_dir(monkeypatch):
    """The validation's ``s_dir`` replaced, call by call, by a given sequence (the first call scores the run's
    start); every other score and all the work are the real ones."""

    def script(values):
        values = list(values)
        real = evaluation.score_edits

        def score_edits(*args, **kwargs):
            return {**real(*args, **kwargs), "s_dir": values.pop(0)}

        monkeypatch.setattr(evaluation, "score_edits", score_edits)

    return script


# ---- the rule, exactly ---------------------------------------------------------------------------------------


def test_early_stopping_counts_validations_without_an_improvement_larger_than_the_threshold():
    stop = EarlyStopping(patience=2, threshold=0.05, metric="s_dir")
    decisions = [stop({"epoch": e, "s_dir": v}) for e, v in enumerate([0.1, 0.3, 0.33, 0.34], start=1)]
    # 0.33 and 0.34 are within the threshold of 0.3: the second of them ends the patience
    assert decisions[:3] == [None, None, None] and decisions[3] is not None
    assert stop.best == 0.3 and stop.best_epoch == 2
    assert "after epoch 4" in decisions[3] and "`s_dir`" in decisions[3] and "best 0.3000 at epoch 2" in decisions[3]


def test_early_stopping_lower_is_better_for_mae_and_a_non_finite_score_never_improves():
    stop = EarlyStopping(patience=1, threshold=0.0, metric="mae")
    assert stop({"epoch": 1, "mae": 0.5}) is None
    assert stop({"epoch": 2, "mae": 0.4}) is None and stop.best_epoch == 2  # smaller: better
    assert stop({"epoch": 3, "mae": float("nan")}) is not None
    stop = EarlyStopping(patience=2, threshold=0.0, metric="s_dir")
    assert stop({"epoch": 1, "s_dir": float("nan")}) is None
    assert "none finite" in stop({"epoch": 2, "s_dir": float("inf")})


# ---- through finetune ----------------------------------------------------------------------------------------


def test_stops_on_a_plateau_keeps_the_best_epoch_and_says_why(scripted_s_dir):
    # start, epochs 1..6: the best is epoch 2; epochs 3 and 4 do not beat it, so patience 2 stops after epoch 4
    scripted_s_dir([0.0, 0.3, 0.5, 0.4, 0.45, 0.9, 0.9])
    pipe, out = run(validation_images=random_images(2, seed=7), early_stopping_patience=2)
    assert [e["epoch"] for e in out.validation] == [1, 2, 3, 4]
    assert out.stopped_early and out.best_epoch == 2
    assert out.stop_reason.startswith("early stopping after epoch 4: `s_dir` has not improved by more than 0")
    assert out.baseline["epoch"] == 0 and out.baseline["s_dir"] == 0.0 and out.flat_warning is None
    provenance = get_provenance(pipe.unet, "default")
    assert provenance["best_epoch"] == 2 and provenance["keep_best"] == "s_dir" and provenance["epochs_trained"] == 4
    # the kept weights and the losses: those of the same run trained for 2 (resp. 4) epochs
    two, _ = run(num_epochs=2)
    assert_identical(adapter_state(pipe), adapter_state(two))
    _, four = run(num_epochs=4)
    assert out.loss_history == four.loss_history


def test_a_run_that_is_not_stopped_reports_that_it_trained_every_epoch():
    _, out = run(num_epochs=2)
    assert not out.stopped_early and out.stop_reason == "trained the `num_epochs`=2 epochs"
    assert out.baseline is None and out.training_scores == [] and out.flat_warning is None


def test_without_held_out_images_the_training_images_scores_decide(scripted_s_dir):
    scripted_s_dir([0.0, 0.2, 0.1, 0.1, 0.9, 0.9, 0.9])  # the best is epoch 1; patience 2 stops after epoch 3
    pipe, out = run(early_stopping_patience=2)
    assert out.validation == [] and [e["epoch"] for e in out.training_scores] == [1, 2, 3]
    assert out.stopped_early and out.best_epoch == 1 and "after epoch 3" in out.stop_reason
    assert get_provenance(pipe.unet, "default")["validation_on"] == "training images"
    one, _ = run(num_epochs=1)
    assert_identical(adapter_state(pipe), adapter_state(one))


def test_the_proxy_is_the_validation_of_the_training_images():
    # the training images as held-out images: the same latents (deterministic inversion, same batches), so the
    # proxy's scores are exactly the validation's
    train = random_images(2)
    _, out = run(
        images=train, num_epochs=3, validation_images=train, early_stopping_patience=5, early_stopping_on="training"
    )
    assert len(out.training_scores) == 3 and out.training_scores == out.validation
    assert all(math.isfinite(e["s_dir"]) for e in out.training_scores)


def test_a_run_that_learns_nothing_is_flagged():
    with pytest.warns(UserWarning, match="Training looks like it is doing nothing: after epoch 2") as record:
        _, out = run(num_epochs=3, learning_rate=1e-12, validation_images=random_images(2, seed=7))
    message = str(next(w.message for w in record if "doing nothing" in str(w.message)))
    assert "`learning_rate`" in message and "`t0`" in message and "prompts" in message
    assert out.flat_warning == message
    gain = max(e["s_dir"] for e in out.validation[:2]) - out.baseline["s_dir"]
    assert gain < FLAT_MIN_GAIN and not out.stopped_early  # a warning, not a stop


def test_a_run_whose_score_rises_is_not_flagged(scripted_s_dir, recwarn):
    scripted_s_dir([0.0, 0.01, 0.0 + FLAT_MIN_GAIN, 0.0])
    _, out = run(num_epochs=3, validation_images=random_images(2, seed=7))
    assert out.flat_warning is None and not [w for w in recwarn if "doing nothing" in str(w.message)]


def test_callback_on_epoch_end_sees_every_epoch_and_can_stop_the_run():
    seen = []

    def callback(pipe, epoch, logs):
        seen.append((epoch, dict(logs)))
        return epoch == 2

    held_out = random_images(3, seed=7)
    pipe, out = run(validation_images=held_out, validation_epochs=2, callback_on_epoch_end=callback)
    assert [epoch for epoch, _ in seen] == [1, 2] and out.stopped_early
    assert out.stop_reason == "`callback_on_epoch_end` asked to stop after epoch 2"
    first, second = seen[0][1], seen[1][1]
    assert first["validation"] is None and first["validation_images"] is None  # epoch 1 is not validated
    assert second["validation"] == out.validation[-1] and second["validation_images"].shape == (3, 3, 16, 16)
    assert second["validation_seconds"] > 0 and second["num_updates"] == 2 * 2  # 2 steps per batch, one batch
    assert first["loss"] == sum(out.loss_history[:2]) / 2 and second["loss"] == sum(out.loss_history[2:]) / 2


@pytest.mark.parametrize(
    "kw, error, match",
    [
        (dict(early_stopping_patience=0), ValueError, "early_stopping_patience"),
        (dict(early_stopping_patience=1.5), TypeError, "early_stopping_patience"),
        (dict(early_stopping_patience=2, early_stopping_threshold=-0.1), ValueError, "early_stopping_threshold"),
        (dict(early_stopping_threshold=0.1), ValueError, "pass `early_stopping_patience` too"),
        (dict(early_stopping_metric="s_dir"), ValueError, "pass `early_stopping_patience` too"),
        (dict(early_stopping_on="training"), ValueError, "pass `early_stopping_patience` too"),
        (dict(early_stopping_patience=2, early_stopping_metric="loss"), ValueError, "early_stopping_metric"),
        (dict(early_stopping_patience=2, early_stopping_metric="s_dir_2"), ValueError, "second CLIP"),
        (dict(early_stopping_patience=2, early_stopping_on="held_out"), ValueError, "early_stopping_on"),
        (dict(early_stopping_patience=2, early_stopping_on="validation"), ValueError, "needs `validation_images`"),
        (
            dict(early_stopping_patience=2, early_stopping_on="training", keep_best="s_dir", validation_images=1),
            ValueError,
            "pass one of them",
        ),
        (dict(early_stopping_patience=2, resume_from="tmp"), ValueError, "cannot be combined with `resume_from`"),
        (dict(callback_on_epoch_end="stop"), TypeError, "callback_on_epoch_end"),
    ],
)
def test_bad_early_stopping_arguments_fail_before_any_work(kw, error, match, tmp_path):
    pipe = make_pipeline()
    if kw.get("validation_images") == 1:
        kw["validation_images"] = random_images(2, seed=7)
    if kw.get("resume_from") == "tmp":  # a folder: the checkpoint itself is read after these checks
        kw["resume_from"] = tmp_path
    calls = []
    pipe.unet.register_forward_hook(lambda *a: calls.append(1))
    with pytest.raises(error, match=match):
        run(pipe, **kw)
    assert calls == []


# ---- the command line ----------------------------------------------------------------------------------------


def test_cli_finetune_stops_early_on_the_training_images_scores(setup, capsys):
    from diffusionclip_pipeline.commands.main import main
    from diffusionclip_pipeline.lora import read_adapter_file

    out = setup / "ada"
    # a cosine cannot improve by more than 2: with patience 1 the run stops after its second epoch, whatever it learns
    argv = ["finetune", "--model", str(setup / "pipe"), "--src", "red circle", "--tar", "blue circle", "--images",
            str(setup / "imgs"), "--output", str(out), "--t0", "50", "--num-inversion-steps", "2",
            "--num-train-steps", "1", "--num-epochs", "3", "--early-stopping-patience", "1",
            "--early-stopping-threshold", "2"]  # fmt: skip
    assert main(argv) == 0
    stdout = capsys.readouterr().out
    assert "stopped before the last epoch: early stopping after epoch 2: `s_dir` has not improved" in stdout
    recorded = read_adapter_file(str(out)).provenance
    assert recorded["epochs_trained"] == 2 and recorded["best_epoch"] in (1, 2)  # keep_best: the higher s_dir
    assert recorded["validation_on"] == "training images"


def test_cli_early_stopping_settings_need_the_patience(setup, capsys):
    from diffusionclip_pipeline.commands.main import main

    argv = ["finetune", "--model", str(setup / "pipe"), "--src", "a", "--tar", "b", "--output", str(setup / "o"),
            "--early-stopping-metric", "mae"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--early-stopping-metric is a setting of early stopping: pass --early-stopping-patience" in err
    assert not (setup / "o").exists()
