"""The encode/decode seam between images and a latent UNet's space, as diffusers' pipelines use each autoencoder.

- `AutoencoderKL` (Stable Diffusion's ``vae``): ``z = (mean - shift_factor) * scaling_factor`` — the posterior's
  *mean*, not a sample, so that encoding is deterministic (DDIM inversion needs the same ``z`` every time); decode
  ``vae.decode(z / scaling_factor + shift_factor)``.
- `VQModel` (`LDMPipeline`'s ``vqvae``): ``z = vqvae.encode(x).latents * scaling_factor`` (the pre-quantisation
  latents), decode ``vqvae.decode(z / scaling_factor)`` (quantised on the way, as `LDMPipeline` does; the quantiser's
  straight-through estimator passes gradients).
- `AutoencoderTiny` (TAESD, a small decoder in SD's latent space, for the CLIP loss only): reads the latents the UNet
  produces (its ``scaling_factor`` is 1).

Images are in [-1, 1] on both sides.
"""

from __future__ import annotations

import torch
from diffusers import AsymmetricAutoencoderKL, AutoencoderKL, AutoencoderTiny, ConsistencyDecoderVAE, VQModel

# the Gaussian-posterior autoencoders: encoded by their posterior mean (deterministic)
KL_AUTOENCODERS = (AutoencoderKL, AsymmetricAutoencoderKL, ConsistencyDecoderVAE)
VAES = (*KL_AUTOENCODERS, AutoencoderTiny)  # what the ``vae`` component may be
AUTOENCODERS = (*VAES, VQModel)


def scale_factor(autoencoder) -> int:
    """Pixels per latent along each side (8 for Stable Diffusion's VAE)."""
    config = autoencoder.config
    if isinstance(autoencoder, AutoencoderTiny):
        return 2 ** (len(config.num_encoder_blocks) - 1)
    for key in ("block_out_channels", "down_block_out_channels", "encoder_block_out_channels"):
        if config.get(key) is not None:
            return 2 ** (len(config[key]) - 1)
    raise TypeError(f"Unsupported autoencoder {type(autoencoder).__name__}: no block_out_channels in its config.")


def latent_channels(autoencoder) -> int:
    return int(autoencoder.config.latent_channels)


def _shift(autoencoder) -> float:
    return float(autoencoder.config.get("shift_factor", None) or 0.0)


def encode(autoencoder, images: torch.Tensor) -> torch.Tensor:
    """Latents of ``images`` (NCHW in [-1, 1]) in the UNet's space (scaled, deterministic)."""
    scaling = float(autoencoder.config.scaling_factor)
    if isinstance(autoencoder, KL_AUTOENCODERS):
        return (autoencoder.encode(images).latent_dist.mean - _shift(autoencoder)) * scaling
    if isinstance(autoencoder, VQModel):
        return autoencoder.encode(images).latents * scaling
    if isinstance(autoencoder, AutoencoderTiny):  # scaling 1: TAESD works in the UNet's (scaled) latent space
        return (autoencoder.encode(images).latents - _shift(autoencoder)) * scaling
    raise TypeError(
        f"Unsupported autoencoder {type(autoencoder).__name__}; expected one of {[c.__name__ for c in AUTOENCODERS]}."
    )


def decode(autoencoder, latents: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] (not clamped) from UNet-space latents; differentiable."""
    scaling = float(autoencoder.config.scaling_factor)
    if isinstance(autoencoder, VAES):  # ConsistencyDecoderVAE decodes stochastically (its own noise)
        return autoencoder.decode(latents / scaling + _shift(autoencoder)).sample
    if isinstance(autoencoder, VQModel):
        return autoencoder.decode(latents / scaling).sample
    raise TypeError(
        f"Unsupported autoencoder {type(autoencoder).__name__}; expected one of {[c.__name__ for c in AUTOENCODERS]}."
    )


def _unsupported(autoencoder) -> TypeError:
    names = ", ".join(c.__name__ for c in AUTOENCODERS)
    return TypeError(f"Unsupported autoencoder {type(autoencoder).__name__}; expected one of {names}.")


class AutoencoderLatents:
    """Part 2 of the family protocol (`base.ModelFamily`) for a denoiser on an autoencoder's latents: the sizes from
    the family's ``autoencoder`` and `encode` / `decode` above, run in the autoencoder's dtype and returned in the
    denoiser's. A family lists it before its base class and defines ``autoencoder``."""

    @property
    def vae_scale_factor(self) -> int:
        return scale_factor(self.autoencoder)

    @property
    def image_channels(self) -> int:
        return int(self.autoencoder.config.in_channels)

    @property
    def image_dtype(self) -> torch.dtype:
        return self.autoencoder.dtype

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        ae = self.autoencoder
        return encode(ae, images.to(ae.dtype)).to(self.pipe.denoiser.dtype)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        ae = self.autoencoder
        return decode(ae, latents.to(ae.dtype))
