"""What a first run should be told: prompts that cannot teach anything, and a progress bar worth watching."""

import io
import re
import warnings

import pytest
from conftest import make_pipeline, random_images

from diffusionclip_pipeline import NoAdapterWarning

TINY = dict(t0=100, num_inversion_steps=2, num_train_steps=1, num_epochs=1, batch_size=2)


def our_warnings(record):
    return [str(w.message) for w in record if "prompt" in str(w.message) or issubclass(w.category, NoAdapterWarning)]


@pytest.mark.parametrize("prompts", [("red circle", "red circle"), ("Red Circle ", " red circle")])
def test_same_prompts_warn_that_the_direction_is_zero(prompts):
    pipe = make_pipeline()
    with pytest.warns(UserWarning, match="the text direction is zero, so the directional CLIP loss is constant"):
        out = pipe.finetune(*prompts, images=random_images(2), **TINY)
    assert out.adapter_name == "default"  # a warning, not an error: the L1 term still trains


def test_different_prompts_or_an_image_direction_do_not_warn():
    pipe = make_pipeline()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        pipe.finetune("red circle", "blue circle", images=random_images(2), adapter_name="a", **TINY)
        pipe.finetune(
            "red circle", "red circle", images=random_images(2), adapter_name="b", source_images=random_images(1),
            target_images=random_images(1, seed=1), **TINY,
        )  # fmt: skip
    assert our_warnings(record) == []


def test_unknown_words_are_warned_once_per_prompt():
    pipe = make_pipeline()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        pipe.finetune("red cat", "blue cat dog", images=random_images(2), **TINY)
    messages = [m for m in our_warnings(record) if "does not know" in m]
    assert len(messages) == 2
    assert messages[0].startswith("`prompt_src` 'red cat' has words the CLIP tokenizer does not know: ['cat']")
    assert messages[1].startswith(
        "`prompt_tar` 'blue cat dog' has words the CLIP tokenizer does not know: ['cat', 'dog']"
    )


def test_sampling_the_training_images_does_not_warn_about_the_missing_adapter():
    pipe = make_pipeline()
    with pytest.warns(NoAdapterWarning):  # what `edit` says when a user calls it with no adapter
        pipe.edit(random_images(1), t0=100, num_inversion_steps=2, num_inference_steps=2, output_type="pt")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        pipe.finetune("red circle", "blue circle", num_sampled_images=2, num_sampling_steps=2, **TINY)
    assert [w for w in record if issubclass(w.category, NoAdapterWarning)] == []


def test_progress_bar_shows_epoch_step_loss_and_time_left():
    pipe = make_pipeline()
    stream = io.StringIO()
    pipe.set_progress_bar_config(disable=False, file=stream, mininterval=0, ascii=True)
    pipe.finetune(
        "red circle", "blue circle", images=random_images(3), **{**TINY, "num_epochs": 2, "num_train_steps": 2}
    )
    lines = re.split(r"[\r\n]", stream.getvalue())
    last = [line for line in lines if "epoch=" in line][-1]
    # 4 batches (2 per epoch), 8 optimizer steps; tqdm's [elapsed<remaining, rate] gives the time left
    assert re.search(r" 4/4 \[\d\d:\d\d<\d\d:\d\d, .*epoch=1, step=8, loss=\d+\.\d{4}\]", last), last
