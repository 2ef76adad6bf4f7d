"""Image inputs: wide PIL modes keep their real range; empty, non-finite and channels-first inputs are refused."""

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
