"""Unconditional latent diffusion (`LDMPipeline` layout: ``vqvae`` = `VQModel` + ``unet`` = `UNet2DModel`, e.g.
``CompVis/ldm-celebahq-256``; also a `UNet2DModel` on an `AutoencoderKL`'s latents): the denoiser works on the
autoencoder's scaled latents (`autoencoders`)."""

from __future__ import annotations

from diffusers import UNet2DModel

from . import autoencoders
from .base import DDIMFamily
from .pixel import PixelFamily, _autoencoder


class LatentFamily(autoencoders.AutoencoderLatents, DDIMFamily):
    """An unconditional `UNet2DModel` on the latents of ``vqvae`` (`VQModel`) or ``vae`` (`AutoencoderKL`)."""

    name = "ldm"
    stock_pipeline = "LDMPipeline"

    @classmethod
    def matches(cls, components) -> bool:
        return isinstance(components["unet"], UNet2DModel) and _autoencoder(components) is not None

    @classmethod
    def check_components(cls, components) -> None:
        PixelFamily.check_components(components)

    @property
    def autoencoder(self):
        return _autoencoder({"vae": self.pipe.vae, "vqvae": self.pipe.vqvae})
