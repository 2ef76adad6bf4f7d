"""Output dataclasses of `DiffusionCLIPPipeline`."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import PIL.Image
import torch
from diffusers.utils import BaseOutput


@dataclass
class DiffusionCLIPInversionOutput(BaseOutput):
    """Output of `DiffusionCLIPPipeline.invert`.

    Args:
        latents (`torch.Tensor`):
            The noised images ``x_t0`` at the last grid timestep, shape ``(batch, channels, size, size)``.
        timesteps (`list[int]`):
            The exact ascending grid that was used, ``[0, ..., t0]``; ``len(timesteps)`` model evaluations.
        image (`torch.Tensor`):
            The preprocessed input images in [-1, 1] that were inverted (``x_0``).
    """

    latents: torch.Tensor
    timesteps: list[int]
    image: torch.Tensor


@dataclass
class DiffusionCLIPPipelineOutput(BaseOutput):
    """Output of `DiffusionCLIPPipeline.edit` (and `__call__`).

    Args:
        images (`list[PIL.Image.Image]`, `np.ndarray` or `torch.Tensor`):
            The edited images, as chosen by ``output_type``.
        latents (`torch.Tensor`):
            The ``x_t0`` latents generation started from (given or obtained by inversion).
        timesteps (`list[int]`):
            The descending generation grid that was used, ``[t0, ..., 0]``.
    """

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    latents: torch.Tensor
    timesteps: list[int]


@dataclass
class DiffusionCLIPTranslationOutput(BaseOutput):
    """Output of `DiffusionCLIPPipeline.translate`.

    Args:
        images (`list[PIL.Image.Image]`, `np.ndarray` or `torch.Tensor`):
            The final images: edited by the active adapters, or the in-domain images when no adapter is active.
        domain_images (`list[PIL.Image.Image]`, `np.ndarray` or `torch.Tensor`):
            The inputs pulled onto the model's domain (after the stochastic noising/denoising rounds), before editing.
    """

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    domain_images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
