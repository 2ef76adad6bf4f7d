"""Pixel-space DDPMs (`DDPMPipeline` layout: ``unet`` = `UNet2DModel` + ``scheduler``, e.g.
``google/ddpm-celebahq-256``): the denoiser works on the images themselves."""

from __future__ import annotations

from diffusers import UNet2DModel

from .base import DDIMFamily


class PixelFamily(DDIMFamily):
    """An unconditional `UNet2DModel` on pixels; no autoencoder, no conditioning."""

    name = "pixel"
    stock_pipeline = "DDPMPipeline"

    @classmethod
    def matches(cls, components) -> bool:
        return isinstance(components["unet"], UNet2DModel) and _autoencoder(components) is None

    @classmethod
    def check_components(cls, components) -> None:
        names = ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")
        given = [name for name in names if components.get(name) is not None]
        if given:
            raise ValueError(f"`{'` / `'.join(given)}` need a text-conditioned `UNet2DConditionModel` `unet`.")


def _autoencoder(components):
    vae = components.get("vae")
    return vae if vae is not None else components.get("vqvae")
