"""Conversion of user images to the model's [-1, 1] NCHW tensors and back.

Accepted inputs (single items or lists of them):

- `PIL.Image.Image` of any mode (converted to RGB, or to L for one-channel models); 16-bit (``I;16``, ``I``) and
  float (``F``) grey images are scaled by their real range (0-65535, and [0, 1] for ``F``) rather than clipped;
- `numpy.ndarray` HWC (or NHWC), either ``uint8`` in [0, 255] or floating point in [0, 1];
- `torch.Tensor` CHW or NCHW, floating point in **[0, 1]**, as diffusers' `VaeImageProcessor` reads tensors and as
  ``output_type="pt"`` returns them (so an output can be fed back in). A tensor with negative values is read in
  [-1, 1], this package's convention before 0.2, with a `FutureWarning` (as `VaeImageProcessor` warns); that reading
  will be removed in 0.3. A [-1, 1] tensor without negative values cannot be told apart: convert with
  ``(x + 1) / 2``;
- `PreparedImages`: tensors already in the model's [-1, 1] range (what `DiffusionCLIPPipeline.prepare_image`
  returns), passed between the package's own calls without another conversion.

Images whose size differs from the model's ``sample_size`` are centre-cropped to a square (the shorter side) and
then resized: PIL inputs with PIL's bicubic filter (antialiased), numpy and tensor inputs with
``torch.nn.functional.interpolate(mode="bicubic", antialias=True)``. Nothing is clamped silently: values outside
the documented ranges, NaN or infinite values, and empty images are an error.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F

_RANGE_TOLERANCE = 1e-3

OLD_TENSOR_RANGE_WARNING = (
    "`{name}` is a torch tensor with negative values: read in [-1, 1], the convention of diffusionclip-pipeline "
    "0.1. Tensors are now read in [0, 1], as diffusers' VaeImageProcessor reads them and as output_type='pt' "
    "returns them; pass (x + 1) / 2. The [-1, 1] reading will be removed in 0.3."
)


@dataclass(frozen=True)
class PreparedImages:
    """Images already in the model's range: an NCHW float tensor in [-1, 1], as `DiffusionCLIPPipeline.prepare_image`
    returns it. The package's own calls pass prepared images in this wrapper so that they are not read again as
    user input (whose tensors are in [0, 1])."""

    tensor: torch.Tensor

    def __len__(self) -> int:
        return int(self.tensor.shape[0])


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 120 else text[:117] + "..."


def _center_crop_resize_tensor(x: torch.Tensor, size: int) -> torch.Tensor:
    h, w = x.shape[-2:]
    if h != w:
        side = min(h, w)
        top, left = (h - side) // 2, (w - side) // 2
        x = x[..., top : top + side, left : left + side]
    if x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
    return x


_WIDE_MODES = {"I;16": 65535.0, "I;16B": 65535.0, "I;16L": 65535.0, "I": 65535.0, "F": 1.0}


def _center_crop_resize_pil(image: PIL.Image.Image, size: int) -> PIL.Image.Image:
    w, h = image.size
    if w != h:
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        image = image.crop((left, top, left + side, top + side))
    if image.size != (size, size):
        image = image.resize((size, size), resample=PIL.Image.BICUBIC)
    return image


def _pil_to_array(image: PIL.Image.Image, size: int, channels: int, name: str) -> np.ndarray:
    if image.width == 0 or image.height == 0:
        raise ValueError(f"`{name}` is an empty image ({image.width}x{image.height}).")
    if image.mode in _WIDE_MODES:  # 16-bit or float grey: PIL's convert("RGB") would clip to 0..255
        scale = _WIDE_MODES[image.mode]
        grey = np.asarray(image, dtype=np.float32) / scale
        if not np.isfinite(grey).all() or grey.min() < -_RANGE_TOLERANCE or grey.max() > 1 + _RANGE_TOLERANCE:
            raise ValueError(
                f"`{name}` is a mode {image.mode!r} image with values outside [0, {scale:g}] or non-finite values."
            )
        resized = _center_crop_resize_pil(PIL.Image.fromarray(grey.clip(0, 1)), size)  # mode "F": full precision
        grey = np.asarray(resized, dtype=np.float32).clip(0, 1)
        return np.repeat(grey[..., None], channels, axis=-1)
    image = _center_crop_resize_pil(image.convert("RGB" if channels == 3 else "L"), size)
    array = np.asarray(image, dtype=np.float32) / 255.0
    return array[..., None] if array.ndim == 2 else array


def _numpy_to_tensor(array: np.ndarray, name: str) -> torch.Tensor:
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim == 3:
        array = array[None]
    if array.ndim != 4:
        raise ValueError(f"`{name}` as a numpy array must be HWC or NHWC, got shape {array.shape}.")
    if array.size == 0:
        raise ValueError(f"`{name}` is an empty array (shape {array.shape}).")
    if array.dtype == np.uint8:
        array = array.astype(np.float32) / 255.0
    elif np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise ValueError(f"`{name}` holds NaN or infinite values.")
        lo, hi = float(array.min()), float(array.max())
        if lo < -_RANGE_TOLERANCE or hi > 1 + _RANGE_TOLERANCE:
            raise ValueError(
                f"`{name}` as a float numpy array must lie in [0, 1], got values in [{lo:.3f}, {hi:.3f}]."
            )
        array = array.astype(np.float32)
    else:
        raise TypeError(f"`{name}` as a numpy array must be uint8 or floating point, got dtype {array.dtype}.")
    return torch.from_numpy(np.ascontiguousarray(array)).permute(0, 3, 1, 2) * 2.0 - 1.0


def _checked_tensor(image: torch.Tensor, name: str) -> torch.Tensor:
    """``image`` as NCHW, after the checks every tensor input gets (dtype, shape, not empty, finite)."""
    if not torch.is_floating_point(image):
        raise TypeError(f"`{name}` as a tensor must be floating point in [0, 1], got dtype {image.dtype}.")
    x = image[None] if image.ndim == 3 else image
    if x.ndim != 4:
        raise ValueError(f"`{name}` as a tensor must be CHW or NCHW, got shape {tuple(image.shape)}.")
    if x.numel() == 0:
        raise ValueError(f"`{name}` must not be empty, got shape {tuple(image.shape)}.")
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"`{name}` holds NaN or infinite values.")
    return x


def preprocess_image(image, size: int, channels: int = 3, name: str = "image") -> torch.Tensor:
    """Converts ``image`` (see the module docstring for what is accepted) to a float32 NCHW tensor in [-1, 1].

    Args:
        image (`PIL.Image.Image`, `np.ndarray`, `torch.Tensor`, `PreparedImages` or a list of them): The image(s).
        size (`int`): The model's square ``sample_size``.
        channels (`int`, *optional*, defaults to 3): The model's input channels (3 for RGB, 1 for grey).
        name (`str`, *optional*, defaults to `"image"`): The argument name used in error messages.

    Returns:
        `torch.Tensor`: Shape ``(batch, channels, size, size)``, float32, in [-1, 1], on the CPU unless the input
        tensor was elsewhere.
    """
    if isinstance(image, (list, tuple)):
        if len(image) == 0:
            raise ValueError(f"`{name}` must not be an empty list.")
        return torch.cat([preprocess_image(item, size, channels, name) for item in image], dim=0)

    if isinstance(image, PIL.Image.Image):
        x = _numpy_to_tensor(_pil_to_array(image, size, channels, name), name)
    elif isinstance(image, np.ndarray):
        x = _numpy_to_tensor(image, name)
        if x.shape[1] != channels:
            hint = ""
            if image.ndim >= 3 and image.shape[-3] == channels:
                hint = " It looks channels-first (CHW); numpy images must be channels-last (HWC or NHWC)."
            raise ValueError(
                f"`{name}` as a numpy array must be channels-last with {channels} channels (HWC or NHWC), got shape "
                f"{image.shape}.{hint}"
            )
        x = _center_crop_resize_tensor(x, size)
    elif isinstance(image, PreparedImages):
        x = _center_crop_resize_tensor(_checked_tensor(image.tensor, name).float(), size)
    elif isinstance(image, torch.Tensor):
        x = _checked_tensor(image, name)
        lo, hi = float(x.min()), float(x.max())
        if lo < -_RANGE_TOLERANCE:  # the old [-1, 1] convention (diffusers' VaeImageProcessor warns the same way)
            warnings.warn(OLD_TENSOR_RANGE_WARNING.format(name=name), FutureWarning, stacklevel=4)
            if lo < -1 - _RANGE_TOLERANCE or hi > 1 + _RANGE_TOLERANCE:
                raise ValueError(f"`{name}` as a tensor must lie in [0, 1], got values in [{lo:.3f}, {hi:.3f}].")
            x = _center_crop_resize_tensor(x.float(), size)
        else:
            if hi > 1 + _RANGE_TOLERANCE:
                raise ValueError(f"`{name}` as a tensor must lie in [0, 1], got values in [{lo:.3f}, {hi:.3f}].")
            x = _center_crop_resize_tensor(x.float() * 2 - 1, size)
    else:
        raise TypeError(
            f"`{name}` must be a PIL image, a numpy array, a torch tensor or a list of them, got {type(image)}: "
            f"{_short(image)}."
        )
    if x.shape[1] != channels:
        raise ValueError(f"`{name}` must have {channels} channels, got {x.shape[1]} (shape {tuple(x.shape)}).")
    return x


def postprocess_image(x: torch.Tensor, output_type: str = "pil"):
    """Converts model-space images (NCHW in [-1, 1]) to ``output_type``.

    Args:
        x (`torch.Tensor`): Images in [-1, 1]; values outside are clamped for display (the generated tensor
            itself is never changed; ``output_type="pt"`` returns it in [0, 1] as diffusers does).
        output_type (`str`, *optional*, defaults to `"pil"`): ``"pil"``, ``"np"`` (NHWC float in [0, 1]) or
            ``"pt"`` (NCHW float in [0, 1]).
    """
    images = (x.detach().float() / 2 + 0.5).clamp(0, 1)
    if output_type == "pt":
        return images
    array = images.cpu().permute(0, 2, 3, 1).numpy()
    if output_type == "np":
        return array
    if output_type == "pil":
        uint8 = (array * 255).round().astype(np.uint8)
        if uint8.shape[-1] == 1:
            return [PIL.Image.fromarray(a[..., 0]) for a in uint8]
        return [PIL.Image.fromarray(a) for a in uint8]
    raise ValueError(f"`output_type` must be one of 'pil', 'np', 'pt', got {output_type!r}.")
