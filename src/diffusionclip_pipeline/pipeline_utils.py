"""Small helpers of `DiffusionCLIPPipeline`: input checks, renamed arguments, reproducible reloads, deterministic
schedulers."""

from __future__ import annotations

import warnings

import numpy as np
import PIL.Image
import torch
from diffusers.utils import logging

from .families.base import as_deterministic

logger = logging.get_logger(__name__)


def _renamed_kwargs(kwargs: dict, edit_strength: float) -> float:
    """`edit`'s ``strength`` is now ``edit_strength`` (diffusers' ``strength`` is the noising depth, our ``t0``)."""
    if "strength" in kwargs:
        warnings.warn(
            "`strength` was renamed `edit_strength` (in diffusers, `strength` is the noising depth, which is `t0` "
            "here); the old name will be removed in a future release.",
            FutureWarning,
            stacklevel=5,
        )
        if edit_strength != 1.0:
            raise TypeError("Pass `edit_strength` or its old name `strength`, not both.")
        edit_strength = kwargs.pop("strength")
    if kwargs:
        raise TypeError(f"`edit` got unexpected keyword argument(s) {sorted(kwargs)}.")
    return edit_strength


def _align_tensors(module: torch.nn.Module, alignment: int = 64) -> None:
    """Copies parameters and buffers that do not start at an ``alignment``-byte boundary into fresh memory.

    Weights loaded from safetensors may be views into the file's buffer at any offset; CPU kernels take other code
    paths on unaligned memory and round differently (up to 7e-7 on the test UNet). Aligned, a reloaded pipeline
    reproduces the saved one's edits bit for bit.
    """
    with torch.no_grad():
        for tensor in list(module.parameters()) + list(module.buffers()):
            if tensor.device.type == "cpu" and tensor.data_ptr() % alignment:
                tensor.data = tensor.data.clone()


def _as_deterministic(scheduler, cls):
    """``cls`` built from ``scheduler``'s config with ``clip_sample=False`` (now `families.base.as_deterministic`)."""
    return as_deterministic(scheduler, cls)


def check_image(image, name: str = "image") -> None:
    """`TypeError` / `ValueError` naming ``name`` unless ``image`` is a PIL image, an array, a tensor or a non-empty
    list of them (tensors of one size)."""
    if isinstance(image, (list, tuple)):
        if len(image) == 0:
            raise ValueError(f"`{name}` must not be an empty list.")
        shapes = {tuple(i.shape) for i in image if torch.is_tensor(i)}
        if len(shapes) > 1:
            raise ValueError(f"`{name}` is a list of tensors of mixed sizes {sorted(shapes)}; resize them first.")
        for item in image:
            check_image(item, name)
        return
    if not isinstance(image, (PIL.Image.Image, np.ndarray, torch.Tensor)):
        raise TypeError(
            f"`{name}` must be a PIL image, a numpy array, a torch tensor or a list of them, got "
            f"{type(image).__name__}: {image!r:.100}."
        )


def batch_size_of(image, latents=None) -> int:
    """How many images ``image`` (or ``latents``, when given) holds."""
    if latents is not None:
        return latents.shape[0]
    if isinstance(image, (list, tuple)):
        return sum(batch_size_of(item) for item in image)
    if isinstance(image, (np.ndarray, torch.Tensor)) and image.ndim == 4:
        return image.shape[0]
    return 1


class NonFiniteResultError(ValueError):
    """A call produced NaN or infinite values: raised instead of returning an image that would come out black."""


def _check_finite_result(tensor: torch.Tensor, what: str, causes: str) -> None:
    if not bool(torch.isfinite(tensor).all()):
        raise NonFiniteResultError(f"{what} holds NaN or infinite values; likely cause: {causes}.")


class NoAdapterWarning(UserWarning):
    """`edit` was called with no adapter active: the result is a reconstruction, not an edit."""
