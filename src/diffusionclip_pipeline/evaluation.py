"""Evaluation of edits and reconstructions: directional CLIP similarity (DiffusionCLIP Sec. 4), MAE and SSIM.

The functions take images in any form `DiffusionCLIPPipeline.invert` accepts (PIL, numpy, torch in [-1, 1]; single
or lists) and work for real models as for the test-bed. Non-square images are centre-cropped.
"""

from __future__ import annotations

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F

from .clip_loss import CLIPDirectionalLoss
from .image_processing import preprocess_image


def _side(images) -> int:
    first = images[0] if isinstance(images, (list, tuple)) else images
    if isinstance(first, PIL.Image.Image):
        return min(first.size)
    if isinstance(first, np.ndarray):
        return min(first.shape[-3:-1]) if first.ndim >= 3 else min(first.shape)
    if torch.is_tensor(first):
        return min(first.shape[-2:])
    raise TypeError(f"Images must be PIL images, numpy arrays or tensors, got {type(first).__name__}.")


def _as_unit(images, name: str, size: int | None = None) -> torch.Tensor:
    """[0, 1] float NCHW (3 channels) at ``size`` (the images' own size by default)."""
    return (preprocess_image(images, size or _side(images), name=name) + 1) / 2


def _two_sets(images, reference) -> tuple[torch.Tensor, torch.Tensor]:
    x = _as_unit(images, "images")
    y = _as_unit(reference, "reference", x.shape[-1])
    if x.shape != y.shape:
        raise ValueError(f"`images` and `reference` differ in shape: {tuple(x.shape)} vs {tuple(y.shape)}.")
    return x, y


def mean_absolute_error(images, reference) -> float:
    """Mean absolute pixel difference on the [0, 1] scale (the paper's reconstruction MAE)."""
    x, y = _two_sets(images, reference)
    return (x - y).abs().mean().item()


def _gaussian_window(size: int, sigma: float) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).float()


def ssim(images, reference, window_size: int = 11, sigma: float = 1.5) -> float:
    """Structural similarity (Wang et al., 2004) on [0, 1] images: Gaussian window, C1 = 0.01², C2 = 0.03².

    Computed per channel over the valid region (no padding) and averaged; for images smaller than the window the
    window shrinks to the image size (odd).
    """
    x, y = (z.double() for z in _two_sets(images, reference))  # E[x^2] - E[x]^2 cancels badly in float32
    size = min(window_size, x.shape[-1] - (1 - x.shape[-1] % 2))
    window = _gaussian_window(size, sigma).to(x)[None, None].repeat(x.shape[1], 1, 1, 1)

    def blur(z):
        return F.conv2d(z, window, groups=x.shape[1])

    c1, c2 = 0.01**2, 0.03**2
    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return s.mean().item()


@torch.no_grad()
def directional_clip_similarity(
    loss_fn: CLIPDirectionalLoss, source_images, edited_images, source_text: str, target_text: str
) -> float:
    """Mean cosine between the image change ``E_I(edited) - E_I(source)`` and the text change (the paper's S_dir).

    Args:
        loss_fn ([`CLIPDirectionalLoss`]): Holds the CLIP model, its preprocessing and the prompt templates.
        source_images / edited_images: The images before and after the edit (pairs, same order).
        source_text / target_text (`str`): The edit's prompts.
    """
    x, y = _two_sets(source_images, edited_images)
    direction = loss_fn.text_direction(source_text, target_text)
    image_direction = loss_fn.encode_images(y * 2 - 1) - loss_fn.encode_images(x * 2 - 1)
    return F.cosine_similarity(image_direction, direction[None].to(image_direction), dim=-1).mean().item()
