"""Output dataclasses of `DiffusionCLIPPipeline`."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import PIL.Image
import torch
from diffusers.utils import BaseOutput


class _RenamedLatents:
    """``.latents``, the old name of the ``x_t0`` field: still readable, with a `FutureWarning`."""

    @property
    def latents(self) -> torch.Tensor:
        warnings.warn(
            "`.latents` was renamed `.x_t0` (the noised image at t0 that generation starts from); the old name will "
            "be removed in a future release.",
            FutureWarning,
            stacklevel=2,
        )
        return self.x_t0


@dataclass
class DiffusionCLIPInversionOutput(_RenamedLatents, BaseOutput):
    """Output of `DiffusionCLIPPipeline.invert`.

    Args:
        x_t0 (`torch.Tensor`):
            The images deterministically noised to ``t0`` (the last grid timestep), in model space, shape
            ``(batch, channels, size, size)``; pass them to `edit(latents=...)`. Formerly ``latents``.
        timesteps (`list[int]`):
            The exact ascending grid that was used, ``[0, ..., t0]``; ``len(timesteps)`` model evaluations.
        image (`torch.Tensor`):
            The preprocessed input images in [-1, 1] that were inverted (``x_0``).
    """

    x_t0: torch.Tensor
    timesteps: list[int]
    image: torch.Tensor


@dataclass
class DiffusionCLIPPipelineOutput(_RenamedLatents, BaseOutput):
    """Output of `DiffusionCLIPPipeline.edit` (and `__call__`).

    Args:
        images (`list[PIL.Image.Image]`, `np.ndarray` or `torch.Tensor`):
            The edited images, as chosen by ``output_type``.
        x_t0 (`torch.Tensor`):
            The noised images at ``t0`` that generation started from (given as ``latents`` or obtained by
            inversion). Formerly ``latents``.
        timesteps (`list[int]`):
            The descending generation grid that was used, ``[t0, ..., 0]``.
    """

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    x_t0: torch.Tensor
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
