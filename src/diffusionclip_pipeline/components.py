"""Which component sets `DiffusionCLIPPipeline` accepts, checked before anything runs (or, for a repository, loads).

Three layouts: a pixel DDPM (``unet`` = `UNet2DModel`), an unconditional latent diffusion model (``vqvae`` =
`VQModel` + ``unet`` = `UNet2DModel`, as `LDMPipeline`) and Stable Diffusion 1.x / 2.x (``vae`` = `AutoencoderKL`,
``text_encoder`` + ``tokenizer``, ``unet`` = `UNet2DConditionModel`). SDXL is refused.
"""

from __future__ import annotations

import os

from diffusers import AutoencoderKL, UNet2DConditionModel, UNet2DModel, VQModel

UNSUPPORTED_PIPELINES = ("StableDiffusionXL", "StableDiffusion3", "Flux", "Kandinsky")


def check_components(unet, vae=None, vqvae=None, text_encoder=None, tokenizer=None) -> None:
    """`ValueError` / `TypeError` naming the component when the set cannot work together."""
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
    conditional = isinstance(unet, UNet2DConditionModel)
    if conditional and (text_encoder is None or tokenizer is None):
        raise ValueError(
            "`unet` is a text-conditioned `UNet2DConditionModel`: pass its `text_encoder` and `tokenizer` "
            f"(got text_encoder={type(text_encoder).__name__}, tokenizer={type(tokenizer).__name__})."
        )
    if not conditional and (text_encoder is not None or tokenizer is not None):
        raise ValueError("`text_encoder` / `tokenizer` need a text-conditioned `UNet2DConditionModel` `unet`.")
    if conditional:
        if unet.config.get("addition_embed_type") is not None or unet.config.get("class_embed_type") is not None:
            raise ValueError(
                "This `unet` needs extra conditioning (addition_embed_type="
                f"{unet.config.get('addition_embed_type')!r}, class_embed_type={unet.config.get('class_embed_type')!r}"
                "), as SDXL's does: only Stable Diffusion 1.x / 2.x UNets are supported."
            )
        if text_encoder.config.hidden_size != unet.config.cross_attention_dim:
            raise ValueError(
                f"`text_encoder` gives {text_encoder.config.hidden_size}-wide hidden states, but `unet` attends to "
                f"{unet.config.cross_attention_dim}."
            )
        if autoencoder is None:
            raise ValueError("A text-conditioned `unet` (Stable Diffusion) needs its `vae`.")


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
