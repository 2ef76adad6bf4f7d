"""Image inputs: wide PIL modes keep their real range; empty, non-finite and channels-first inputs are refused."""

import contextlib

import numpy as np
import PIL.Image
import pytest
import torch

from diffusionclip_pipeline.image_processing import preprocess_image


def test_16_bit_and_float_images_keep_their_range():
    ramp = np.linspace(0, 65535, 16 * 16).reshape(16, 16).astype(np.uint16)
    x = preprocess_image(PIL.Image.fromarray(ramp), 16)
    expected = torch.from_numpy(ramp.astype(np.float32) / 65535 * 2 - 1)
    torch.testing.assert_close(x[0, 0], expected, atol=1e-6, rtol=0)
    assert torch.equal(x[0, 0], x[0, 2]) and len(torch.unique(x)) == 256  # grey, not clipped to two levels
    half = PIL.Image.fromarray(np.full((8, 8), 0.25, np.float32))  # mode "F" in [0, 1]
    torch.testing.assert_close(preprocess_image(half, 8), torch.full((1, 3, 8, 8), -0.5))
    with pytest.raises(ValueError, match="outside"):
        preprocess_image(PIL.Image.fromarray(np.full((8, 8), 3.0, np.float32)), 8)


@pytest.mark.parametrize(
    "image, match",
    [
        (PIL.Image.new("RGB", (0, 0)), "empty image"),
        (np.zeros((0, 4, 3), np.uint8), "empty array"),
        (torch.zeros(1, 3, 0, 0), "must not be empty"),
        (torch.zeros(0, 3, 8, 8), "must not be empty"),
        (np.full((4, 4, 3), np.nan, np.float32), "NaN"),
        (torch.full((3, 4, 4), float("inf")), "NaN or infinite"),
        (np.zeros((3, 16, 16), np.float32), "channels-first"),
    ],
)
def test_bad_images_are_refused_clearly(image, match):
    with pytest.raises(ValueError, match=match):
        preprocess_image(image, 8)


# ---- torch tensors are read in [0, 1], as diffusers' VaeImageProcessor reads them (issue 29, item 1) -------------


def test_a_tensor_in_zero_one_reads_as_the_same_numpy_image():
    rgb = np.random.default_rng(0).random((8, 8, 3)).astype(np.float32)
    from_numpy = preprocess_image(rgb, 8)
    from_tensor = preprocess_image(torch.from_numpy(rgb).permute(2, 0, 1), 8)
    torch.testing.assert_close(from_tensor, from_numpy, rtol=0, atol=0)
    torch.testing.assert_close(from_numpy, torch.from_numpy(rgb).permute(2, 0, 1)[None] * 2 - 1, rtol=0, atol=0)


def test_an_edit_fed_back_in_is_read_as_its_numpy_output():
    """The issue's case: `output_type="pt"` returns [0, 1]; feeding it back must equal the numpy path."""
    from conftest import make_pipeline, random_images

    pipe = make_pipeline(with_clip=False)
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(t0=300, num_inversion_steps=2, num_inference_steps=2)
    with pytest.warns(FutureWarning):  # random_images are [-1, 1]: 0.1's convention, still read, with a warning
        pt = pipe.edit(random_images(1), output_type="pt", **kwargs).images
        np_out = pipe.edit(random_images(1), output_type="np", **kwargs).images
    torch.testing.assert_close(pipe.prepare_image(pt), pipe.prepare_image(np_out[0]), rtol=0, atol=1e-6)


def test_the_old_range_is_read_with_a_future_warning():
    x = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with pytest.warns(FutureWarning, match=r"read in \[-1, 1\].*\(x \+ 1\) / 2"):
        old = preprocess_image(x, 8)
    torch.testing.assert_close(old, x, rtol=0, atol=0)
    torch.testing.assert_close(preprocess_image((x + 1) / 2, 8), x, rtol=0, atol=1e-6)


@pytest.mark.parametrize("low, high", [(0.0, 1.5), (-2.0, 1.0), (-0.5, 1.2)])
def test_tensors_outside_both_ranges_are_refused(low, high):
    x = torch.linspace(low, high, 3 * 8 * 8).reshape(1, 3, 8, 8)
    with pytest.warns(FutureWarning) if low < 0 else contextlib.nullcontext():
        with pytest.raises(ValueError, match=r"must lie in \[0, 1\]"):
            preprocess_image(x, 8)


def test_prepared_images_pass_through_unchanged():
    from diffusionclip_pipeline.image_processing import PreparedImages

    x = torch.rand(2, 3, 8, 8) * 0.5  # a [-1, 1] tensor without negative values: only the wrapper reads it right
    torch.testing.assert_close(preprocess_image(PreparedImages(x), 8), x, rtol=0, atol=0)
    torch.testing.assert_close(preprocess_image(x, 8), x * 2 - 1, rtol=0, atol=0)
