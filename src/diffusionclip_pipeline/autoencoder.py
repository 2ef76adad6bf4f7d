"""Deprecated location of the autoencoder seam: use `diffusionclip_pipeline.families.autoencoders` (removed in 0.3)."""

import warnings

from .families.autoencoders import AUTOENCODERS, decode, encode, latent_channels, scale_factor  # noqa: F401

warnings.warn(
    "`diffusionclip_pipeline.autoencoder` moved to `diffusionclip_pipeline.families.autoencoders`; the old path will "
    "be removed in 0.3.",
    FutureWarning,
    stacklevel=2,
)
