"""Image files in and out for the command line, the examples and the test-bed: find, read, tile into a grid, write.

Neutral on purpose: it imports nothing else from the package, so any module (the CLI, its plugins, the examples)
can use it without an import cycle.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable

import PIL.Image
import PIL.ImageOps

from .utils.io import atomic_write

__all__ = [
    "IMAGE_SUFFIXES",
    "ImageConversionWarning",
    "as_model_input",
    "find_images",
    "image_grid",
    "read_image",
    "read_images",
    "save_atomic",
    "unique_stems",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def find_images(paths: list[str]) -> list[str]:
    """The image files that ``paths`` name: files as given, and each folder's files ending in `IMAGE_SUFFIXES`
    (sorted by name). Nothing is opened.

    Raises:
        `FileNotFoundError`: a path does not exist. `ValueError`: no image was found.
    """
    files = []
    for path in paths:
        if os.path.isdir(path):
            files += sorted(os.path.join(path, f) for f in os.listdir(path) if f.lower().endswith(IMAGE_SUFFIXES))
        elif os.path.isfile(path):
            files.append(path)
        else:
            raise FileNotFoundError(f"no such image file or folder: {path}")
    if not files:
        raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) found in {paths}")
    return files


class ImageConversionWarning(UserWarning):
    """An input image lost information on the way to the model (transparency, the frames after the first)."""


# 16-bit and float grey: kept as they are, `image_processing` scales them by their real range (RGB would clip them)
WIDE_MODES = ("I;16", "I;16B", "I;16L", "I", "F")
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")


def as_model_input(
    image: PIL.Image.Image, name: str = "image", on_loss: Callable[[str], None] | None = None
) -> PIL.Image.Image:
    """``image`` as the model takes it, decoded; each choice is the one an image viewer makes:

    - the EXIF orientation is applied (a phone's portrait photo stays upright);
    - 16-bit and float grey images (modes ``I;16``, ``I``, ``F``) are kept as they are: `image_processing` scales them
      by their real range (0-65535, [0, 1]), where ``convert("RGB")`` would clip them to white;
    - transparent areas are composited onto white, with an `ImageConversionWarning` (the model has no alpha);
    - of an animation (GIF, APNG, WebP) only the first frame is used, with an `ImageConversionWarning`;
    - every other mode is converted to RGB.

    ``on_loss(message)`` is called instead of the warning when given (a server collects the messages of one request
    this way: `warnings.catch_warnings` is not thread-safe).
    """
    on_loss = on_loss or (lambda message: warnings.warn(message, ImageConversionWarning, stacklevel=4))
    frames = getattr(image, "n_frames", 1)
    if frames > 1:
        on_loss(f"{name} has {frames} frames (an animation): only the first is used.")
        image.seek(0)
    image = PIL.ImageOps.exif_transpose(image)  # a copy (decoded), upright
    if image.mode in WIDE_MODES:
        return image
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        if rgba.getextrema()[3][0] < 255:
            on_loss(f"{name} has transparent areas: they are composited onto white.")
            white = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return PIL.Image.alpha_composite(white, rgba).convert("RGB")
        return rgba.convert("RGB")
    return image.convert("RGB")


def read_image(
    path: str, max_pixels: int | None = None, on_loss: Callable[[str], None] | None = None
) -> PIL.Image.Image:
    """The image at ``path``, fully read, as the model takes it (`as_model_input`: upright, RGB or 16-bit/float grey,
    transparency onto white and only an animation's first frame, each with a warning).

    Args:
        path (`str`): The image file.
        max_pixels (`int`, *optional*): Refuse images of more pixels than this (read from the header, before any
            pixel is decoded); PIL's own decompression-bomb limit applies in any case.
        on_loss (`Callable[[str], None]`, *optional*): Called with each message instead of the
            `ImageConversionWarning` (see `as_model_input`).

    Raises:
        `OSError` naming ``path``: not an image PIL can read, truncated, larger than ``max_pixels`` or than PIL's
        decompression-bomb limit (``PIL.Image.MAX_IMAGE_PIXELS``; a file whose header claims, say, 30000x30000 pixels
        is refused before any pixel is decoded).
    """
    try:
        with warnings.catch_warnings():  # PIL only warns between 1x and 2x its limit: refuse those too
            warnings.simplefilter("error", PIL.Image.DecompressionBombWarning)
            with PIL.Image.open(path) as image:
                if max_pixels is not None and image.width * image.height > max_pixels:
                    raise OSError(f"{image.width}x{image.height} pixels, more than the {max_pixels} allowed")
                return as_model_input(image, os.path.basename(path), on_loss)
    except (PIL.Image.DecompressionBombError, PIL.Image.DecompressionBombWarning) as error:
        raise OSError(f"cannot read image {path}: refused as a possible decompression bomb ({error})") from error
    except (OSError, ValueError, SyntaxError) as error:  # PIL raises all three for broken files
        raise OSError(f"cannot read image {path}: {error}") from error


def read_images(paths: list[str]) -> tuple[list[PIL.Image.Image], list[str]]:
    """Images from files and folders (a folder's images sorted by name), as the model takes them (`read_image`).

    Args:
        paths (`list[str]`): Image files and folders; a folder contributes its files ending in `IMAGE_SUFFIXES`.

    Returns:
        `tuple[list[PIL.Image.Image], list[str]]`: the images and their file names (without the folder; two inputs
        may share one, see `unique_stems`).

    Raises:
        `FileNotFoundError`: a path does not exist. `ValueError`: no image was found. `OSError`: a file is not an
        image PIL can read (see `read_image`).
    """
    files = find_images(paths)
    return [read_image(f) for f in files], [os.path.basename(f) for f in files]


def unique_stems(files: list[str]) -> list[str]:
    """One output stem per input file, unique even when files of different folders (or suffixes) share a name.

    The first ``x.png`` keeps ``x``; later ones get ``x-1``, ``x-2``, ... (skipping stems another input has), so
    ``["a/x.png", "b/x.png", "c/y.png"]`` gives ``["x", "x-1", "y"]``.
    """
    stems = [os.path.splitext(os.path.basename(f))[0] for f in files]
    taken, result = set(), []
    for stem in stems:
        candidate, k = stem, 0
        while candidate in taken or (candidate != stem and candidate in stems):
            k += 1
            candidate = f"{stem}-{k}"
        taken.add(candidate)
        result.append(candidate)
    return result


def image_grid(rows: list[list[PIL.Image.Image]], pad: int = 2) -> PIL.Image.Image:
    """Pastes rows of images into one grid, ``pad`` white pixels around and between them.

    Every image is resized to the first one's size; a short row leaves white cells at its end. (Unlike
    `diffusers.utils.make_image_grid`, which has no padding and needs ``rows * cols`` images.)
    """
    if not rows or not rows[0]:
        raise ValueError("`rows` must hold at least one image.")
    w, h = rows[0][0].size
    cols = max(len(r) for r in rows)
    grid = PIL.Image.new("RGB", (cols * (w + pad) + pad, len(rows) * (h + pad) + pad), (255, 255, 255))
    for i, row in enumerate(rows):
        for j, image in enumerate(row):
            grid.paste(image.convert("RGB").resize((w, h)), (pad + j * (w + pad), pad + i * (h + pad)))
    return grid


def save_atomic(image: PIL.Image.Image, path: str) -> None:
    """Writes ``image`` to ``path`` atomically (`utils.io.atomic_write`): ``path`` never holds a partial image.

    The format follows ``path``'s extension (PNG when PIL does not know it).
    """
    image_format = PIL.Image.registered_extensions().get(os.path.splitext(path)[1].lower(), "PNG")
    atomic_write(path, lambda tmp: image.save(tmp, format=image_format))
