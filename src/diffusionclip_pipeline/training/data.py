"""The data of a fine-tuning run: the training images (given or sampled from the model) and their latents ``x_t0``,
computed once before training by the original model and optionally cached on disk."""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Iterator

import torch
from safetensors.torch import load_file

from ..image_processing import PreparedImages
from ..loaders.lora_file import atomic_save_file, weights_fingerprint
from ..loaders.lora_state import adapters_disabled
from ..utils.locking import unet_lock
from .config import FinetuneConfig

__all__ = ["inverted_batches", "precompute_latents", "tensor_bytes", "training_images"]


def training_images(
    pipe, images: torch.Tensor | None, config: FinetuneConfig, device: torch.device, generator: torch.Generator
) -> torch.Tensor:
    """The training images ``x0`` in [-1, 1], on ``device`` in the UNet's dtype: ``images`` (as `pipe.prepare_image`
    returns them), or, if `None`, ``config.num_sampled_images`` images sampled from the original model (every
    adapter bypassed) by DDIM from pure noise drawn from ``generator``."""
    if images is None:
        unet = pipe.denoiser
        shape = (config.num_sampled_images, unet.config.in_channels) + (unet.config.sample_size,) * 2
        noise = torch.randn(shape, generator=generator).to(device, unet.dtype)
        with adapters_disabled(unet), warnings.catch_warnings():
            # the original model on purpose: `edit`'s NoAdapterWarning (only a reconstruction) is expected here
            warnings.filterwarnings("ignore", message="No adapter is active")
            images = pipe.edit(
                latents=noise, t0=pipe.num_train_timesteps - 1, num_inference_steps=config.num_sampling_steps,
                output_type="pt",
            ).images * 2 - 1  # fmt: skip
    return images.to(device=device, dtype=pipe.denoiser.dtype)


def tensor_bytes(x: torch.Tensor) -> bytes:
    """The raw bytes of ``x`` (on the CPU, contiguous): what the fingerprints of tensors hash."""
    return x.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()


def _cached_latent(path: str, x0: torch.Tensor) -> torch.Tensor | None:
    """The cache entry at ``path`` if it is a readable, finite ``(1, C, H, W)`` float tensor; else `None` (a miss:
    it is recomputed and rewritten), with a warning when the file exists but is damaged."""
    if not os.path.isfile(path):
        return None
    try:
        value = load_file(path)["latents"]
        if value.ndim != 4 or value.shape[0] != 1 or not value.is_floating_point() or not torch.isfinite(value).all():
            raise ValueError(f"shape {tuple(value.shape)}, dtype {value.dtype}")
    except Exception as error:  # safetensors raises its own types for damaged files
        warnings.warn(f"The latent cache entry {path!r} is damaged ({str(error)[:100]}): recomputed.", stacklevel=3)
        return None
    return value.to(x0)


def _latent_cache_key(x0: torch.Tensor, t0: int, steps: int, unet_fingerprint: str, fixed_point: int = 0) -> str:
    digest = hashlib.sha256(tensor_bytes(x0.float()))
    digest.update(f"|{tuple(x0.shape)}|t0={t0}|steps={steps}|unet={unet_fingerprint}".encode())
    if fixed_point:  # keys of plain inversion stay as they were
        digest.update(f"|fixed_point={fixed_point}".encode())
    return digest.hexdigest()


def inverted_batches(
    pipe, x0: torch.Tensor, batch_size: int, t0: int, num_inversion_steps: int, num_fixed_point_iterations: int = 0,
    prompt: str | None = None, encoding: str = "ddim", inversion_start: str = "clean", generator=None,
) -> Iterator[tuple[slice, torch.Tensor]]:  # fmt: skip
    """Yields ``(part, x_t0)``: the latents `pipe.invert` gives for ``x0[part]`` (images as `pipe.prepare_image`
    returns them), ``batch_size`` images at a time, in order; a list of generators (one per image) is sliced with
    the images. The arguments are those of `pipe.invert`, checked by the caller (they are not checked again)."""
    for start in range(0, x0.shape[0], batch_size):
        part = slice(start, min(start + batch_size, x0.shape[0]))
        batch_generator = generator[part] if isinstance(generator, list) else generator
        with unet_lock(pipe.denoiser), torch.no_grad():  # as `pipe.invert` holds them
            x_t0 = pipe._invert(
                PreparedImages(x0[part]), t0, num_inversion_steps, num_fixed_point_iterations, prompt, encoding,
                inversion_start, batch_generator,
            )[0]  # fmt: skip
        yield part, x_t0


def precompute_latents(
    pipe, x0: torch.Tensor, t0: int, num_inversion_steps: int, batch_size: int, cache_dir=None,
    num_fixed_point_iterations: int = 0, prompt: str | None = None, encoding: str = "ddim", generator=None,
):  # fmt: skip
    """``x_t0`` of every image by deterministic inversion with the original UNet (no grad), optionally cached;
    with ``encoding="noise"`` by EffDiff's closed-form forward noise from ``generator`` instead (never cached).

    The cache holds one safetensors file per image, keyed by the image's content, ``t0``, the step count, the
    fixed-point iterations and the base UNet's config and weights, so a cache entry can never be used for other
    inputs, settings or another model.

    Returns:
        `tuple[torch.Tensor, int]`: the latents and how many came from the cache.
    """
    if encoding == "noise":
        with torch.no_grad():
            return pipe.family.noise_to(pipe.family.encode(x0), t0, generator), 0
    latents = [None] * x0.shape[0]
    paths = [None] * x0.shape[0]
    if cache_dir is not None:
        fingerprint = weights_fingerprint(pipe.denoiser)
        if prompt:  # a conditional UNet's inversion depends on its prompt (keys of the empty prompt stay as they were)
            fingerprint += f"|prompt={prompt}"
        for i in range(x0.shape[0]):
            key = _latent_cache_key(x0[i], t0, num_inversion_steps, fingerprint, num_fixed_point_iterations)
            paths[i] = os.path.join(cache_dir, f"latent-{key}.safetensors")
            latents[i] = _cached_latent(paths[i], x0)
    todo = [i for i in range(x0.shape[0]) if latents[i] is None]
    inverted = inverted_batches(
        pipe, x0[todo], batch_size, t0, num_inversion_steps, num_fixed_point_iterations, prompt
    )
    for part, out in inverted:
        for j, i in enumerate(todo[part]):
            latents[i] = out[j : j + 1]
            if cache_dir is not None:  # written batch by batch: an interrupted run keeps what it computed
                atomic_save_file({"latents": latents[i]}, paths[i], metadata={"t0": str(t0)})
    return torch.cat(latents), x0.shape[0] - len(todo)
