"""Input images reach the model without silent loss (docs/reliability.md, "Inputs and loaded weights"): 16-bit grey
keeps its range (it became pure white), the EXIF orientation is applied, transparency is composited onto white and
an animation's first frame is used, each loss with an `ImageConversionWarning`."""

from __future__ import annotations

import warnings

import numpy as np
import PIL.Image
import pytest

from diffusionclip_pipeline.commands.main import main
from diffusionclip_pipeline.image_io import ImageConversionWarning, read_image
from diffusionclip_pipeline.image_processing import preprocess_image

FAST_EDIT = ["--t0", "50", "--num-inversion-steps", "2", "--num-inference-steps", "2"]


def ramp16(path, size: int = 16) -> None:
    """A 16-bit grey PNG: black on the left, white on the right."""
    PIL.Image.fromarray(np.tile(np.linspace(0, 65535, size).astype(np.uint16), (size, 1))).save(path)


def read_quietly(path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning expected
        return read_image(str(path))


def test_16_bit_grey_keeps_its_range(tmp_path):
    ramp16(tmp_path / "g.png")
    image = read_quietly(tmp_path / "g.png")
    x = preprocess_image(image, 16)
    assert x.shape == (1, 3, 16, 16)
    assert float(x[..., 0].mean()) < -0.9 and float(x[..., -1].mean()) > 0.9  # was +1 everywhere


def test_the_cli_edits_a_16_bit_grey_png_as_a_ramp_not_white(setup):
    ramp16(setup / "imgs" / "grey16.png")
    argv = ["edit", "--model", str(setup / "pipe"), "--images", str(setup / "imgs" / "grey16.png"), "--output",
            str(setup / "out"), *FAST_EDIT]  # fmt: skip
    assert main(argv) == 0
    grid = np.asarray(PIL.Image.open(setup / "out" / "grid.png").convert("L"), dtype=np.int16)
    before = grid[2:18, 2:18]  # the top row: the input as the model sees it
    assert before[:, 0].mean() < 40 and before[:, -1].mean() > 215


def test_exif_orientation_is_applied(tmp_path):
    image = PIL.Image.new("RGB", (8, 4), "red")
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    image.save(tmp_path / "photo.jpg", exif=exif)
    assert read_quietly(tmp_path / "photo.jpg").size == (4, 8)


def test_transparency_is_composited_onto_white_with_a_warning(tmp_path):
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 0], rgba[:4, :, 3] = 255, 255  # red, the lower half transparent
    PIL.Image.fromarray(rgba).save(tmp_path / "a.png")
    with pytest.warns(ImageConversionWarning, match="transparent areas"):
        image = read_image(str(tmp_path / "a.png"))
    assert image.mode == "RGB" and image.getpixel((0, 0)) == (255, 0, 0) and image.getpixel((0, 7)) == (255, 255, 255)
    rgba[..., 3] = 255  # opaque: no warning
    PIL.Image.fromarray(rgba).save(tmp_path / "opaque.png")
    assert read_quietly(tmp_path / "opaque.png").getpixel((0, 7)) == (255, 0, 0)


def test_an_animation_gives_its_first_frame_with_a_warning(tmp_path):
    frames = [PIL.Image.new("RGB", (8, 8), colour) for colour in ("red", "blue", "green")]
    frames[0].save(tmp_path / "a.gif", save_all=True, append_images=frames[1:])
    with pytest.warns(ImageConversionWarning, match="3 frames"):
        image = read_image(str(tmp_path / "a.gif"))
    assert image.getpixel((0, 0)) == (255, 0, 0)


def test_the_cli_says_what_an_image_lost(setup, capsys):
    rgba = np.full((16, 16, 4), 255, np.uint8)
    rgba[8:, :, 3] = 0
    PIL.Image.fromarray(rgba).save(setup / "imgs" / "alpha.png")
    argv = ["edit", "--model", str(setup / "pipe"), "--images", str(setup / "imgs" / "alpha.png"), "--output",
            str(setup / "out"), *FAST_EDIT]  # fmt: skip
    assert main(argv) == 0
    assert "diffusionclip edit: warning: alpha.png has transparent areas" in capsys.readouterr().err


def test_max_pixels_is_checked_before_decoding(tmp_path):
    PIL.Image.new("RGB", (64, 64)).save(tmp_path / "big.png")
    with pytest.raises(OSError, match="more than the 1000 allowed"):
        read_image(str(tmp_path / "big.png"), max_pixels=1000)
