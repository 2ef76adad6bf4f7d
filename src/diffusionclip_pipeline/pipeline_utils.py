"""Small helpers of `DiffusionCLIPPipeline`: input checks, renamed arguments, reproducible reloads, deterministic
schedulers."""

from __future__ import annotations

import warnings

import numpy as np
import PIL.Image
import torch
from diffusers.utils import logging

from .families.base import as_deterministic
from .image_processing import PreparedImages
from .utils.checks import check_number

logger = logging.get_logger(__name__)


# diffusers' names for the attention arguments of the SD3 / Flux pipelines, accepted for `cross_attention_kwargs`
ATTENTION_KWARGS_ALIASES = ("attention_kwargs", "joint_attention_kwargs")


def _lora_scale(cross_attention_kwargs, kwargs: dict) -> float:
    """The LoRA scale of ``cross_attention_kwargs={"scale": s}`` (or of diffusers' other names for that argument,
    taken out of ``kwargs``); 1 when not given. Other keys are refused: the families' denoiser calls take none."""
    given = {name: kwargs.pop(name) for name in ATTENTION_KWARGS_ALIASES if name in kwargs}
    if cross_attention_kwargs is not None:
        given["cross_attention_kwargs"] = cross_attention_kwargs
    given = {name: value for name, value in given.items() if value is not None}
    if len(given) > 1:
        raise TypeError(f"Pass one of {sorted(given)}: they are the same argument.")
    if not given:
        return 1.0
    ((name, value),) = given.items()
    if not isinstance(value, dict):
        raise TypeError(f"`{name}` must be a dict such as {{'scale': 0.5}}, got {type(value).__name__}.")
    unknown = sorted(map(str, set(value) - {"scale"}))
    if unknown:
        raise ValueError(f"`{name}` may hold only 'scale' (the LoRA scale) here, got {unknown}.")
    return check_number(value.get("scale", 1.0), f"{name}['scale']")


def _concat_conditions(parts: list):
    """One conditioning for a batch from per-image ones (`None`, tensors, or dicts of tensors, as families return)."""
    if parts[0] is None:
        return None
    if isinstance(parts[0], dict):
        return {key: torch.cat([part[key] for part in parts]) for key in parts[0]}
    return torch.cat(parts)


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
    if not isinstance(image, (PIL.Image.Image, np.ndarray, torch.Tensor, PreparedImages)):
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
    if isinstance(image, PreparedImages):
        return len(image)
    return 1


class NonFiniteResultError(ValueError):
    """A call produced NaN or infinite values: raised instead of returning an image that would come out black."""


def _check_finite_result(tensor: torch.Tensor, what: str, causes: str) -> None:
    if not bool(torch.isfinite(tensor).all()):
        raise NonFiniteResultError(f"{what} holds NaN or infinite values; likely cause: {causes}.")


class NoAdapterWarning(UserWarning):
    """`edit` was called with no adapter active: the result is a reconstruction, not an edit."""
