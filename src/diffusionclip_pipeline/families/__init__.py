"""Model families: one module per family behind one protocol (`base.ModelFamily`), and the check that picks the
family of a component set before anything runs (or, for a repository, loads).

Three families today: a pixel DDPM (`pixel`: ``unet`` = `UNet2DModel`), an unconditional latent diffusion model
(`ldm`: ``vqvae`` = `VQModel` or ``vae`` = `AutoencoderKL`, + ``unet`` = `UNet2DModel`, as `LDMPipeline`) and Stable
Diffusion 1.x / 2.x (`sd`: ``vae`` = `AutoencoderKL`, ``text_encoder`` + ``tokenizer``, ``unet`` =
`UNet2DConditionModel`). SDXL is refused. Adding a family is adding one module and listing it in `FAMILIES`
(see docs/design.md, "How to add a model family").
"""

from __future__ import annotations

import os

from diffusers import AutoencoderKL, UNet2DConditionModel, UNet2DModel, VQModel

from .base import ModelFamily
from .ldm import LatentFamily
from .pixel import PixelFamily
from .sd import StableDiffusionFamily

__all__ = ["FAMILIES", "LatentFamily", "ModelFamily", "PixelFamily", "StableDiffusionFamily", "check_components"]

# the first whose `matches` accepts a component set is its family
FAMILIES: tuple[type[ModelFamily], ...] = (StableDiffusionFamily, LatentFamily, PixelFamily)

UNSUPPORTED_PIPELINES = ("StableDiffusionXL", "StableDiffusion3", "Flux", "Kandinsky")


def check_components(unet, vae=None, vqvae=None, text_encoder=None, tokenizer=None) -> type[ModelFamily]:
    """The family of this component set; `ValueError` / `TypeError` naming the component when it cannot work."""
    if not isinstance(unet, (UNet2DModel, UNet2DConditionModel)):
        raise TypeError(f"`unet` must be a `UNet2DModel` or a `UNet2DConditionModel`, got {type(unet).__name__}.")
    if vae is not None and vqvae is not None:
        raise ValueError("Pass at most one autoencoder: `vae` (AutoencoderKL) or `vqvae` (VQModel), not both.")
    if vae is not None and not isinstance(vae, AutoencoderKL):
        raise TypeError(f"`vae` must be an `AutoencoderKL`, got {type(vae).__name__} (a VQModel goes in `vqvae`).")
    if vqvae is not None and not isinstance(vqvae, VQModel):
        raise TypeError(f"`vqvae` must be a `VQModel`, got {type(vqvae).__name__}.")
    autoencoder = vae if vae is not None else vqvae
    if autoencoder is not None and autoencoder.config.latent_channels != unet.config.in_channels:
        name = "vae" if vae is not None else "vqvae"
        raise ValueError(
            f"`{name}` makes {autoencoder.config.latent_channels}-channel latents, but `unet` takes "
            f"{unet.config.in_channels} input channels."
        )
    components = {"unet": unet, "vae": vae, "vqvae": vqvae, "text_encoder": text_encoder, "tokenizer": tokenizer}
    family = next(family for family in FAMILIES if family.matches(components))
    family.check_components(components)
    return family


def check_layout(pretrained_model_name_or_path, kwargs: dict) -> None:
    """Refuses repositories of unsupported pipelines (SDXL, ...) before any weights load."""
    from diffusers import DiffusionPipeline

    path = os.fspath(pretrained_model_name_or_path)
    load_kwargs = {k: kwargs[k] for k in ("cache_dir", "local_files_only", "token", "revision") if k in kwargs}
    try:
        config = DiffusionPipeline.load_config(path, **load_kwargs)
    except (OSError, ValueError):
        return  # let `from_pretrained` report the missing or unreachable repository in its own words
    name = str(config.get("_class_name", ""))
    if any(name.startswith(prefix) for prefix in UNSUPPORTED_PIPELINES) or "text_encoder_2" in config:
        raise ValueError(
            f"{path!r} is a {name or 'two-text-encoder'} repository: DiffusionCLIPPipeline supports DDPM, LDM and "
            "Stable Diffusion 1.x / 2.x layouts (SDXL and later are not supported)."
        )
