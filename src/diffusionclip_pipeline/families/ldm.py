"""Unconditional latent diffusion (`LDMPipeline` layout: ``vqvae`` = `VQModel` + ``unet`` = `UNet2DModel`, e.g.
``CompVis/ldm-celebahq-256``; also a `UNet2DModel` on an `AutoencoderKL`'s latents): the denoiser works on the
autoencoder's scaled latents (`autoencoders`)."""

from __future__ import annotations

import torch
from diffusers import UNet2DModel

from . import autoencoders
from .base import DDIMFamily
from .pixel import PixelFamily, _autoencoder


class LatentFamily(DDIMFamily):
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

    @property
    def vae_scale_factor(self) -> int:
        return autoencoders.scale_factor(self.autoencoder)

    @property
    def image_channels(self) -> int:
        return int(self.autoencoder.config.in_channels)

    @property
    def image_dtype(self) -> torch.dtype:
        return self.autoencoder.dtype

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        ae = self.autoencoder
        return autoencoders.encode(ae, images.to(ae.dtype)).to(self.pipe.denoiser.dtype)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        ae = self.autoencoder
        return autoencoders.decode(ae, latents.to(ae.dtype))
