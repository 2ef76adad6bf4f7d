"""Image files in and out for the command line, the examples and the test-bed: read, tile into a grid, write.

Neutral on purpose: it imports nothing else from the package, so any module (the CLI, its plugins, the examples)
can use it without an import cycle.
"""

from __future__ import annotations

import os

import PIL.Image

__all__ = ["IMAGE_SUFFIXES", "image_grid", "read_images", "save_atomic"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def read_images(paths: list[str]) -> tuple[list[PIL.Image.Image], list[str]]:
    """Images from files and folders (a folder's images sorted by name), converted to RGB.

    Args:
        paths (`list[str]`): Image files and folders; a folder contributes its files ending in `IMAGE_SUFFIXES`.

    Returns:
        `tuple[list[PIL.Image.Image], list[str]]`: the images and their file names (without the folder).

    Raises:
        `FileNotFoundError`: a path does not exist. `ValueError`: no image was found. `OSError`: a file is not an
        image PIL can read.
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
    images = []
    for f in files:
        try:
            images.append(PIL.Image.open(f).convert("RGB"))
        except (OSError, PIL.UnidentifiedImageError) as error:
            raise OSError(f"cannot read image {f}: {error}") from error
    return images, [os.path.basename(f) for f in files]


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
    """Writes ``image`` to ``path`` through a temporary file, so that ``path`` never holds a partial image.

    The format follows ``path``'s extension (PNG when PIL does not know it).
    """
    image_format = PIL.Image.registered_extensions().get(os.path.splitext(path)[1].lower(), "PNG")
    tmp = path + ".tmp"
    try:
        image.save(tmp, format=image_format)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
